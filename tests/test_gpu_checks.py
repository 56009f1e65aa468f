"""The CPU path of the GPU script's device checks (benchmarks/gpu_checks.py --smoke)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from gpu_checks import main  # noqa: E402


def test_device_checks_pass_on_the_cpu(capsys):
    assert main(["--device", "cpu", "--smoke"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 6 and "FAIL" not in out
