"""guidance-eval: end-to-end runs on the embedded model, kill-and-resume, and clear errors."""

import contextlib
import json

import numpy as np
import pytest
import torch

from evaluation import ReferenceStats
from evaluation.cli import main as cli_main
from evaluation.runner import TIMING_KEYS, RunSpec, StrategySpec, load_source, run

SPECS = [
    {"label": "CFG", "strategy": {"name": "CFG", "params": {}}, "scales": [2.0, 4.0]},
    {"label": "APG", "strategy": {"name": "APG", "params": {"norm_threshold": 8.0}}, "scales": [4.0]},
]


@contextlib.contextmanager
def killed_at_update(monkeypatch, n: int):
    """The run inside stops with a Ctrl-C (KeyboardInterrupt) at the n-th batch any setting adds to its metrics."""
    from evaluation import suite

    calls = {"n": 0}
    original = suite.MetricSuite.update

    def dying_update(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(suite.MetricSuite, "update", dying_update)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(suite.MetricSuite, "update", original)


def spec(reference, **kw):
    base = dict(strategies=[StrategySpec.parse(s) for s in SPECS], num_images=6, batch_size=4, steps=3,
                metrics=("fid", "kid", "pr", "saturation", "class_accuracy"), reference=reference, device="cpu")
    return RunSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def source(reference):
    return load_source(spec(reference))


def comparable(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def test_run_writes_results_table_grids_and_plots(reference, source, tmp_path):
    rows = run(spec(reference), tmp_path, progress=False, source=source)
    assert [r["setting"] for r in rows] == ["CFG@2", "CFG@4", "APG@4"]
    for r in rows:
        assert r["num_images"] == 6 and r["nfe_per_image"] == 6.0  # 3 steps x (cond + uncond)
        assert np.isfinite(r["fid"]) and 0 <= r["class_accuracy"] <= 1 and 0 <= r["saturation_mean"] <= 1
        assert {"kid_mean", "precision", "recall", "seconds_per_image"} <= set(r)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == rows and saved["metrics"]["inception"]["preset"] == "legacy_tf"
    assert (tmp_path / "results.csv").read_text().count("\n") == 4
    assert (tmp_path / "grids" / "APG@4.png").is_file()
    assert (tmp_path / "plots" / "fid_vs_class_accuracy.png").is_file()
    assert rows[0]["fid"] != rows[1]["fid"]  # a different scale gives different images


def test_killed_run_resumes_to_identical_numbers(reference, source, tmp_path, monkeypatch):
    full = run(spec(reference), tmp_path / "full", progress=False, source=source, checkpoint_seconds=3600)
    with killed_at_update(monkeypatch, 4):  # second batch of the second setting
        run(spec(reference), tmp_path / "killed", progress=False, source=source)
    # The interrupted setting saved its finished batch on the way out (Ctrl-C), despite the long interval.
    saved = torch.load(tmp_path / "killed" / "state" / "CFG@4.rank0-of-1.pt", weights_only=True)
    assert saved["done_batches"] == 1
    resumed = run(spec(reference, batch_size=4), tmp_path / "killed", progress=False, source=source)
    assert comparable(resumed) == comparable(full)


def test_sample_set_does_not_depend_on_batch_size(reference, source, tmp_path):
    a = run(spec(reference, batch_size=6, metrics=("saturation", "class_accuracy")), tmp_path / "a",
            progress=False, source=source)
    b = run(spec(reference, batch_size=4, metrics=("saturation", "class_accuracy")), tmp_path / "b",
            progress=False, source=source)
    for x, y in zip(a, b):
        assert x["class_accuracy"] == y["class_accuracy"]
        assert x["saturation_mean"] == pytest.approx(y["saturation_mean"], rel=1e-6)


def test_run_folder_with_other_settings_is_refused(reference, source, tmp_path):
    run(spec(reference, metrics=("saturation",)), tmp_path, progress=False, source=source)
    with pytest.raises(ValueError, match="made with other settings.*num_images .folder: 6, now: 7"):
        run(spec(reference, metrics=("saturation",), num_images=7), tmp_path, progress=False, source=source)


def test_clear_errors(reference, tmp_path, capsys):
    with pytest.raises(ValueError, match="allowed: fid, kid, pr, saturation"):
        spec(reference, metrics=("fid", "sharpness"))
    with pytest.raises(ValueError, match="name='Nope' is not a known strategy"):
        StrategySpec.parse({"label": "x", "strategy": {"name": "Nope"}, "scales": [2]})
    with pytest.raises(ValueError, match="malformed"):
        StrategySpec.parse({"strategy": {"name": "CFG"}})
    bad_dim = tmp_path / "bad.npz"
    ReferenceStats(torch.zeros(64, dtype=torch.float64), torch.eye(64, dtype=torch.float64), 10, "legacy_tf",
                   "x").save(bad_dim)
    with pytest.raises(ValueError, match="64-d statistics"):
        load_source(spec(str(bad_dim)))
    with pytest.raises(SystemExit):
        cli_main(["run", "--strategies", json.dumps(SPECS), "--prompts", str(tmp_path / "missing.txt"),
                  "--out", str(tmp_path / "o"), "--metrics", "saturation"])
    assert "the prompt file does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name, n", [("cifar10-test", 10_000), ("cifar10-train", 50_000), (None, 10_000)])
def test_shipped_references_by_name(name, n):
    source = load_source(spec(name, metrics=("fid",)))
    assert source.inputs.reference.n == n


# --- the guide model's evaluations (autoguidance) ------------------------------------------------------

AG_SPECS = [
    {"label": "CFG", "strategy": {"name": "CFG", "params": {}}, "scales": [2.0]},
    {"label": "AG", "strategy": {"name": "Autoguidance", "params": {"guide_model": "runner-test-guide"}},
     "scales": [2.0]},
    {"label": "AG+CFG", "strategy": {"name": "Autoguidance", "params": {"mix": 0.5, "guide_model": "runner-test-guide"}},
     "scales": [2.0]},
]


@pytest.fixture
def test_guide(source, monkeypatch):
    """A guide model registered under a test-only name: a smaller random UNet of the embedded family."""
    from test_autoguidance import smaller

    from pipelines import register_guide_model
    from pipelines.guide import GUIDE_MODELS

    guide = smaller(source.pipe.unet, block_out_channels=[16, 32, 32])
    monkeypatch.setitem(GUIDE_MODELS, "runner-test-guide", None)  # undone after the test
    register_guide_model("runner-test-guide", lambda: guide)
    return guide


def ag_spec(reference, **kw):
    return spec(reference, **{"strategies": [StrategySpec.parse(s) for s in AG_SPECS], "num_images": 4,
                              "batch_size": 2, "steps": 2, "metrics": ("saturation",), **kw})


def test_guide_model_evaluations_are_reported_apart(reference, source, test_guide, tmp_path, capsys):
    from evaluation.report import format_table, load_rows, write_report

    rows = run(ag_spec(reference), tmp_path, progress=False, source=source)
    cfg, ag, mixed = rows
    # denoiser rows: CFG cond + uncond, AG cond only, AG+CFG cond + uncond; guide rows: one a step with a guide
    assert cfg["nfe_per_image"] == 4.0 and "guide_nfe_per_image" not in cfg
    assert ag["nfe_per_image"] == 2.0 and ag["guide_nfe_per_image"] == 2.0
    assert mixed["nfe_per_image"] == 4.0 and mixed["guide_nfe_per_image"] == 2.0
    table = write_report(tmp_path)
    header, _, *lines = table.splitlines()
    cols = [c.strip() for c in header.strip("|").split("|")]
    guide_col = cols.index("guide_nfe_per_image")
    assert cols[guide_col - 1] == "nfe_per_image"
    assert [line.strip("|").split("|")[guide_col].strip() for line in lines] == ["0", "2", "2"]
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert "guide_nfe_per_image" in csv_lines[0] and len(csv_lines) == 4
    # a run folder written before the column existed still renders (no guide column at all)
    old = [{k: v for k, v in r.items() if k != "guide_nfe_per_image"} for r in load_rows(tmp_path)]
    assert "guide_nfe" not in format_table(old) and "nfe_per_image" in format_table(old)


def test_perturbed_evaluations_are_reported_apart(reference, source, tmp_path):
    """PAG on the embedded UNet's mid-block attention: 2 denoiser rows and 1 perturbed row a step, the latter in
    its own column (and in the NFE a reader adds up), none for a rule without a perturbed branch."""
    specs = [StrategySpec.parse(s) for s in ({"label": "CFG", "strategy": {"name": "CFG", "params": {}},
                                              "scales": [2.0]},
                                             {"label": "PAG", "strategy": {"name": "PAG", "params": {"pag_scale": 2.0}},
                                              "scales": [2.0]})]
    rows = run(spec(reference, strategies=specs, num_images=2, batch_size=2, steps=2, metrics=("saturation",)),
               tmp_path, progress=False, source=source)
    cfg, pag = rows
    assert "perturbed_nfe_per_image" not in cfg and cfg["nfe_per_image"] == 4.0
    assert pag["nfe_per_image"] == 4.0 and pag["perturbed_nfe_per_image"] == 2.0


def test_guide_nfe_survives_kill_and_resume_and_old_checkpoints_are_read(reference, source, test_guide, tmp_path,
                                                                        monkeypatch):
    full = run(ag_spec(reference), tmp_path / "full", progress=False, source=source, checkpoint_seconds=0)
    with killed_at_update(monkeypatch, 4):  # second batch of the AG setting
        run(ag_spec(reference), tmp_path / "killed", progress=False, source=source, checkpoint_seconds=0)
    state = tmp_path / "killed" / "state" / "AG@2.rank0-of-1.pt"
    saved = torch.load(state, weights_only=True)
    assert saved["done_batches"] == 1 and saved["guide_nfe_sum"] == 4.0  # 2 images x 2 steps
    resumed = run(ag_spec(reference), tmp_path / "killed", progress=False, source=source)
    assert comparable(resumed) == comparable(full)
    # Checkpoints written before guide counting: a guide setting is recomputed, any other one is resumed.
    for name in ("AG@2", "CFG@2"):
        path = tmp_path / "full" / "state" / f"{name}.rank0-of-1.pt"
        old = torch.load(path, weights_only=True)
        del old["guide_nfe_sum"]
        torch.save(old, path)
    (tmp_path / "full" / "results.json").unlink()
    from evaluation import suite

    original, updates = suite.MetricSuite.update, []
    monkeypatch.setattr(suite.MetricSuite, "update", lambda self, *a, **k: updates.append(1) or original(self, *a, **k))
    again = run(ag_spec(reference), tmp_path / "full", progress=False, source=source)
    assert len(updates) == 2  # CFG (finished) is read; AG recomputes its 2 batches; AG+CFG has the key
    assert [r["guide_nfe_per_image"] for r in again[1:]] == [2.0, 2.0]


def test_a_checkpoint_of_another_run_is_refused_naming_the_key(reference, source, tmp_path, monkeypatch):
    """Before: a checkpoint from a --seed 1 folder, resumed in a --seed 0 folder, reported seed 1's numbers."""
    import shutil

    one = dict(strategies=[StrategySpec.parse(SPECS[0])], metrics=("saturation",))
    seed1, seed0 = tmp_path / "seed1", tmp_path / "seed0"
    with killed_at_update(monkeypatch, 2):  # both folders hold a checkpoint of setting CFG@2 and no results
        run(spec(reference, seed=1, **one), seed1, progress=False, source=source, checkpoint_seconds=0)
    with killed_at_update(monkeypatch, 2):
        run(spec(reference, seed=0, **one), seed0, progress=False, source=source, checkpoint_seconds=0)
    (checkpoint,) = (seed1 / "state").glob("CFG@2*.pt")
    shutil.copy(checkpoint, seed0 / "state" / checkpoint.name)
    from evaluation.spec import InputError

    with pytest.raises(InputError, match=r"made by a run with other settings \(differing: seed \(checkpoint: 1, "
                                        r"this run: 0\)\)"):
        run(spec(reference, seed=0, **one), seed0, progress=False, source=source)


def test_a_second_spec_list_keeps_the_folders_earlier_settings_in_its_results(reference, source, tmp_path):
    """Before: a second run with another spec list into a finished folder dropped the earlier settings from
    results.json, results.csv and table.md (their checkpoints survived)."""
    first = dict(strategies=[StrategySpec.parse(SPECS[0])], metrics=("saturation",))
    second = dict(strategies=[StrategySpec.parse(SPECS[1])], metrics=("saturation",))
    run(spec(reference, **first), tmp_path, progress=False, source=source)
    rows = run(spec(reference, **second), tmp_path, progress=False, source=source)
    assert [r["setting"] for r in rows] == ["APG@4"]  # what this run evaluated
    kept = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["setting"] for r in kept] == ["CFG@2", "CFG@4", "APG@4"]
    table = (tmp_path / "table.md").read_text()
    assert all(k in table for k in ("CFG", "APG")) and (tmp_path / "results.csv").read_text().count("\n") == 4


def test_a_folder_being_written_is_refused_to_a_second_run(reference, source, tmp_path):
    """Before: two runs at once in one folder, and one deleted the other's live .tmp file."""
    from filelock import FileLock

    from evaluation.runner import LOCK_NAME
    from evaluation.spec import InputError

    one = dict(strategies=[StrategySpec.parse(SPECS[0])], metrics=("saturation",))
    run(spec(reference, **one), tmp_path, progress=False, source=source)
    live = tmp_path / "state" / "live.pt.tmp"
    live.write_bytes(b"being written")
    with FileLock(str(tmp_path / LOCK_NAME)):  # another run holds the folder
        with pytest.raises(InputError, match="is being written by another guidance-eval run"):
            run(spec(reference, **one), tmp_path, progress=False, source=source)
    assert live.read_bytes() == b"being written"  # nothing of the other run was touched


def _cfg_spec(label, scales):
    return StrategySpec.parse({"label": label, "strategy": {"name": "CFG", "params": {}}, "scales": scales})


@pytest.mark.parametrize("labels, message", [
    (["CFG", "cfg"], "labels 'CFG' and 'cfg' differ only in case"),
    (["CFG", " CFG  "], "differ only in case, spaces or Unicode form"),
    (["Caf\u00e9", "Cafe\u0301"], "differ only in case, spaces or Unicode form"),  # NFC and NFD of one word
])
def test_labels_that_look_alike_are_refused(labels, message):
    from evaluation.spec import InputError

    with pytest.raises(InputError, match=message):
        RunSpec(strategies=[_cfg_spec(label, [3.0]) for label in labels], device="cpu")


def test_scales_that_print_alike_get_their_own_names_and_equal_scales_are_named():
    from evaluation.spec import InputError

    keys = [k for k, _, _ in RunSpec(strategies=[_cfg_spec("A", [2, 2.0000001, 1234567, 1234568, 7.5])],
                                     device="cpu").settings()]
    assert keys == ["A@2", "A@2.0000001", "A@1234567.0", "A@1234568.0", "A@7.5"]
    with pytest.raises(InputError, match=r"lists the scale 2 twice \(equal numbers are one setting\)"):
        RunSpec(strategies=[_cfg_spec("A", [2, 2.0])], device="cpu")


def test_a_folder_or_checkpoint_made_with_other_pipeline_weights_is_refused(reference, source, tmp_path, monkeypatch):
    """The pipeline's name is not its weights: a folder retrained under the same name gives other numbers."""
    import evaluation.runner as runner
    from evaluation.spec import InputError

    one = dict(strategies=[StrategySpec.parse(SPECS[0])], metrics=("saturation",))
    assert runner.pipeline_weights("embedded") == runner.pipeline_weights("embedded") is not None
    run(spec(reference, **one), tmp_path, progress=False, source=source)
    monkeypatch.setattr(runner, "pipeline_weights", lambda pipeline: "0123456789abcdef")
    with pytest.raises(InputError, match=r"differing: pipeline_weights \(folder: '[0-9a-f]{16}', now: "
                                         r"'0123456789abcdef'\)"):
        run(spec(reference, **one), tmp_path, progress=False, source=source)


def test_a_folder_written_before_the_weights_fingerprint_still_resumes(reference, source, tmp_path):
    one = dict(strategies=[StrategySpec.parse(SPECS[0])], metrics=("saturation",))
    rows = run(spec(reference, **one), tmp_path, progress=False, source=source)
    record = json.loads((tmp_path / "settings.json").read_text())
    del record["run"]["pipeline_weights"]  # as an earlier version wrote it
    (tmp_path / "settings.json").write_text(json.dumps(record))
    assert comparable(run(spec(reference, **one), tmp_path, progress=False, source=source)) == comparable(rows)
