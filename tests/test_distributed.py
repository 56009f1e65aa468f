"""guidance-eval run under a 2-process gloo group equals the single-process run; kill-and-resume works."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from evaluation.runner import TIMING_KEYS, RunSpec, StrategySpec, run

SPECS = [
    {"label": "CFG", "strategy": {"name": "CFG", "params": {}}, "scales": [3.0]},
    {"label": "AG", "strategy": {"name": "AdaptiveGuidance", "params": {"threshold": 0.5}}, "scales": [3.0]},
]
INTEGER_KEYS = ("num_images", "nfe_per_image", "class_accuracy")


def make_spec(reference):
    return RunSpec(strategies=[StrategySpec.parse(s) for s in SPECS], num_images=7, batch_size=2, steps=3,
                   metrics=("fid", "kid", "pr", "saturation", "class_accuracy"), reference=reference, device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, reference, out, die_at_update):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if die_at_update:
        from evaluation import suite

        original, calls = suite.MetricSuite.update, {"n": 0}

        def dying_update(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == die_at_update:  # every rank dies at the same batch: the job was killed
                raise SystemExit(3)
            return original(self, *args, **kwargs)

        suite.MetricSuite.update = dying_update
    try:
        run(make_spec(reference), out, progress=False)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def launch(reference, out, die_at_update=0):
    mp.start_processes(worker, args=(2, free_port(), reference, str(out), die_at_update), nprocs=2,
                       start_method="spawn", join=True)


def rows_of(out):
    return json.loads((out / "results.json").read_text())["rows"]


def assert_same(single, multi):
    assert [r["setting"] for r in single] == [r["setting"] for r in multi]
    for a, b in zip(single, multi):
        for key, value in a.items():
            if key in TIMING_KEYS or not isinstance(value, (int, float)):
                continue
            if key in INTEGER_KEYS:
                assert b[key] == value, key
            else:
                assert b[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.fixture(scope="module")
def single(reference, tmp_path_factory):
    return run(make_spec(reference), tmp_path_factory.mktemp("single"), progress=False)


def test_two_processes_equal_one(reference, single, tmp_path):
    launch(reference, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["processes"] == 2
    assert_same(single, rows_of(tmp_path))
    assert sorted(p.name for p in (tmp_path / "state").iterdir())[0].endswith(".rank0-of-2.pt")


def test_killed_two_process_run_resumes_without_loss(reference, single, tmp_path):
    with pytest.raises(Exception):
        launch(reference, tmp_path, die_at_update=3)  # second setting's first batch
    assert not (tmp_path / "results.json").exists() or len(rows_of(tmp_path)) < 2
    launch(reference, tmp_path)
    assert_same(single, rows_of(tmp_path))
    with pytest.raises(ValueError, match="another number of processes"):
        run(make_spec(reference), tmp_path, progress=False)  # one process on a 2-process folder
