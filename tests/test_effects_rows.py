"""Two measurement jobs may share one rows.json (benchmarks/effects.py): no row is lost."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

APPEND = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from effects import append_row
rows, job, start = Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
time.sleep(max(0.0, start - time.time()))  # both jobs begin together, whatever their import time
for i in range(40):
    append_row(rows, {"key": f"{job}-{i}", "pad": "x" * 20000}, {"job": job}, rows.parent / "rows.lock")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="the lock is POSIX flock; on Windows run one job per --out")
def test_two_jobs_appending_to_one_rows_file_keep_every_row(tmp_path):
    rows = tmp_path / "rows.json"
    start = str(time.time() + 15)
    jobs = [subprocess.Popen([sys.executable, "-c", APPEND, str(BENCHMARKS), str(rows), job, start]) for job in "ab"]
    assert [job.wait(timeout=300) for job in jobs] == [0, 0]
    keys = [r["key"] for r in json.loads(rows.read_text())["rows"]]
    assert sorted(keys) == sorted(f"{job}-{i}" for job in "ab" for i in range(40))
