"""The batch evaluation runner: the one place that wires a pipeline, strategies and metrics.

For every setting (a strategy configuration at one guidance scale) it generates N images in
batches and streams them into the metrics (images are never all held in memory). The metric states
are checkpointed to `<out>/state/<setting>.pt` every `checkpoint_seconds` and when the setting ends.
A run killed at any moment, restarted with the same command, resumes after the last checkpointed batch
and ends with the same numbers: image i always gets seed (seed, i) and condition i, whatever the batch
it falls in. Settings may be added to a finished run folder: rerun with the longer spec list and only
the new settings are computed.

Strategy specs (JSON): {"label": "APG", "strategy": {"name": "APG", "params": {...}}, "scales": [3, 5]}.
`"strategy": null` runs the pipeline's own CFG with no hook (the native baseline). The scale is
passed as the pipeline call's own guidance scale; strategies whose scale is None take it.

Under torchrun / accelerate launch every process takes the image indices i % world_size == rank,
checkpoints to its own `<setting>.rank<r>-of-<w>.pt`, and only rank 0 writes results, grids (from its
own images) and plots; metric states are reduced across processes when computed.

`prepare` checks everything and writes nothing; `execute` runs. `run` is both.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guidance import from_config

from guidance.atomic import atomic_save, atomic_write_text, remove_stale_tmp
from .distributed import Dist, init_distributed
from .spec import (EMBEDDED_DEFAULT_REFERENCE, SHIPPED_REFERENCES, InputError, RunSpec, StrategySpec, check_device,
                   check_local_pipeline, reference_path, safe_name)
from .suite import MetricSuite, SuiteInputs

__all__ = ["RunSpec", "StrategySpec", "InputError", "SHIPPED_REFERENCES", "EMBEDDED_REFERENCE", "TIMING_KEYS",
           "load_source", "prepare", "execute", "run"]

EMBEDDED_REFERENCE = SHIPPED_REFERENCES[EMBEDDED_DEFAULT_REFERENCE]
DEFAULT_STATS_DIR = EMBEDDED_REFERENCE.parent
TIMING_KEYS = ("seconds_per_image",)
# A setting's checkpoint holds float64 feature moments (2048 x 2048: 32 MiB) whatever N is; writing it
# after every batch made checkpoints most of a run's disk traffic. Once a minute bounds that to
# about 0.5 MiB/s and loses at most a minute of work on a kill.
CHECKPOINT_SECONDS = 60.0
CHECKPOINT_VERSION = 2


def image_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _log(message: str) -> None:
    print(f"guidance-eval: {message}", file=sys.stderr, flush=True)


@dataclass
class Source:
    """A loaded pipeline plus what the metrics need from it."""

    pipe: Any
    inputs: SuiteInputs
    conditions: list  # class ids or prompts, cycled over image indices
    by_class: bool
    captions: list[str] | None = None  # per class id, for CLIP score on class-conditional pipelines

    def call(self, indices: list[int], scale: float, steps: int, seed: int, device: str,
             **extra: Any) -> torch.Tensor:
        """uint8 (B, 3, H, W) images for these image indices (extra: more pipeline arguments)."""
        gens = [torch.Generator(device=device if device != "mps" else "cpu").manual_seed(image_seed(seed, i))
                for i in indices]
        conds = [self.conditions[i % len(self.conditions)] for i in indices]
        kwargs: dict[str, Any] = {"num_inference_steps": steps, "generator": gens, "output_type": "pt", **extra}
        if self.by_class:
            kwargs["class_labels"] = conds
        else:
            kwargs["prompt"] = conds
        from pipelines import adapter_for

        scale_kw = adapter_for(self.pipe).scale_kw
        kwargs[scale_kw] = scale
        if scale_kw == "true_cfg_scale":
            kwargs["negative_prompt"] = [""] * len(conds)
        images = self.pipe(**kwargs).images
        if not torch.isfinite(images).all():
            # (uint8 conversion would turn NaN into black pixels and the metrics would score them.)
            raise FloatingPointError(f"the pipeline produced non-finite images at scale {scale:g} (image indices "
                                     f"{indices[0]}..{indices[-1]}): the sampler diverged; try a smaller scale")
        return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)

    def labels(self, indices: list[int]) -> torch.Tensor | None:
        if not self.by_class:
            return None
        return torch.tensor([self.conditions[i % len(self.conditions)] for i in indices])

    def prompts(self, indices: list[int]) -> list[str] | None:
        if self.by_class:
            return None if self.captions is None else [self.captions[self.conditions[i % len(self.conditions)]]
                                                       for i in indices]
        return [self.conditions[i % len(self.conditions)] for i in indices]


def load_reference(reference: str, feature_dim: int):
    """ReferenceStats from a shipped name or an .npz path; an unusable file is an InputError naming it."""
    from .fid import ReferenceStats

    path = reference_path(reference)
    hint = "make one with `guidance-eval stats --source IMAGES --out ref.npz`, or pass cifar10-test / cifar10-train"
    if path.is_dir():
        raise InputError(f"--reference {reference!r} is a folder; pass an .npz file; {hint}")
    if not path.is_file():
        raise InputError(f"--reference {reference!r}: no such file; {hint}")
    try:
        return ReferenceStats.load(path, feature_dim=feature_dim)
    except (ValueError, KeyError, OSError, EOFError) as e:
        raise InputError(f"--reference {reference!r}: {e}; {hint}") from None


def load_clip_backend(model: str, pretrained: str | None, device: str):
    """--clip-model / --clip-pretrained: an open_clip model name and tag or local weights file, or a local
    transformers CLIP folder (then no --clip-pretrained)."""
    from .clip_score import OpenClipBackend, TransformersClipBackend

    if Path(model).is_dir():
        if pretrained is not None:
            raise InputError(f"--clip-pretrained {pretrained!r}: not used with a transformers CLIP folder "
                             f"(--clip-model {model!r}); drop it")
        return TransformersClipBackend.from_pretrained(model, device=device)
    import open_clip

    if model not in open_clip.list_models() and not model.startswith(("hf-hub:", "local-dir:")):
        raise InputError(f"--clip-model {model!r} is not an open_clip model name nor a local folder; allowed: "
                         f"e.g. ViT-B-32, ViT-L-14-quickgelu (`open_clip.list_models()` lists "
                         f"{len(open_clip.list_models())})")
    if pretrained is None:
        raise InputError(f"--clip-model {model!r} needs --clip-pretrained: an open_clip tag (e.g. "
                         f"{', '.join(t for _, t in open_clip.list_pretrained()[:1])}; "
                         "`open_clip.list_pretrained()`) or a local weights file; random weights are no score")
    try:
        return OpenClipBackend(model, pretrained=pretrained, device=device)
    except FileNotFoundError as e:
        raise InputError(f"--clip-pretrained {pretrained!r}: {e}") from None
    except RuntimeError as e:  # open_clip: unknown tag, or weights of another architecture
        raise InputError(f"--clip-pretrained {pretrained!r} does not fit --clip-model {model!r}: "
                         f"{str(e).splitlines()[0]}") from None


def _class_captions(pipe, num_classes: int) -> list[str]:
    names = getattr(getattr(pipe, "config", None), "class_names", None) or [str(i) for i in range(num_classes)]
    return [f"a photo of a {name}" for name in names]


@contextlib.contextmanager
def _quiet_loading():
    """No 'Loading pipeline components' bars from diffusers: the run has its own progress line."""
    from diffusers.utils import logging as diffusers_logging

    was_enabled = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            diffusers_logging.enable_progress_bar()


def load_source(spec: RunSpec, clip_backend=None, classifier=None, device: str | None = None) -> Source:
    with _quiet_loading():
        return _load_source(spec, clip_backend, classifier, device)


def _load_source(spec: RunSpec, clip_backend, classifier, device: str | None) -> Source:
    from .inception import InceptionFeatures

    device = device or spec.device
    needs_inception = any(m in spec.metrics for m in ("fid", "kid", "pr"))
    extractor = InceptionFeatures(device=device) if needs_inception else None
    reference = None
    if needs_inception:
        if spec.reference is None:
            raise InputError("FID/KID/PR need reference statistics: pass --reference FILE.npz (see "
                             "`guidance-eval stats`) or a shipped name (cifar10-test, cifar10-train)")
        reference = load_reference(spec.reference, extractor.feature_dim)
    if clip_backend is None and "clip_score" in spec.metrics:
        if not spec.clip_model:
            raise InputError("metric clip_score needs CLIP weights: pass --clip-model NAME --clip-pretrained "
                             "TAG_OR_FILE (open_clip), or --clip-model FOLDER (a transformers CLIP folder)")
        clip_backend = load_clip_backend(spec.clip_model, spec.clip_pretrained, device)
    if spec.pipeline == "embedded":
        from pipelines import load_embedded

        model = load_embedded(device, scheduler=_check_scheduler(spec.scheduler))  # a class or None
        num_classes = model.pipe.num_classes
        labels = spec.class_labels if spec.class_labels is not None else list(range(num_classes))
        out_of_range = [c for c in labels if c >= num_classes]
        if out_of_range:
            raise InputError(f"--class-labels {out_of_range}: out of range; allowed: ids 0..{num_classes - 1} "
                             "or 'all'")
        inputs = SuiteInputs(reference, extractor, classifier or model.eval_classifier, num_classes, clip_backend)
        return Source(model.pipe, inputs, labels, by_class=True, captions=_class_captions(model.pipe, num_classes))
    pipe = _load_pipeline(spec.pipeline)
    if spec.scheduler:
        pipe.scheduler = _check_scheduler(spec.scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    by_class = spec.class_labels is not None
    conditions = spec.class_labels if by_class else spec.prompts
    if not conditions:
        raise InputError(f"--pipeline {spec.pipeline!r} needs --prompts FILE or --class-labels")
    if "clip_score" in spec.metrics and by_class:
        raise InputError("metric clip_score needs --prompts (captions) on a hub or local pipeline")
    inputs = SuiteInputs(reference, extractor, classifier, None, clip_backend)
    return Source(pipe, inputs, conditions, by_class)


def _check_scheduler(name: str | None):
    if name is None:
        return None
    import diffusers

    from pipelines.parametrization import is_scheduler_class

    cls = getattr(diffusers, name, None)
    if not is_scheduler_class(cls):
        if isinstance(cls, type) and hasattr(cls, "_backends"):  # diffusers' placeholder for a missing extra
            import importlib.util

            missing = [b for b in cls._backends if importlib.util.find_spec(b) is None] or list(cls._backends)
            raise InputError(f"--scheduler {name!r} needs {', '.join(missing)}, not installed here; install it or "
                             "pick another scheduler")
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and n[0].isupper())
        raise InputError(f"--scheduler {name!r} is not a diffusers scheduler class; allowed: {', '.join(known)}")
    return cls


def _load_pipeline(name: str):
    from diffusers import DiffusionPipeline

    path = check_local_pipeline(name)
    if path is not None:
        return DiffusionPipeline.from_pretrained(path)
    try:
        return DiffusionPipeline.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise InputError(f"--pipeline {name!r} could not be loaded as a hub id ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]}); allowed: 'embedded', a hub id (owner/name) reachable or "
                         "cached, or a local pipeline folder") from None


# ------------------------------------------------------------------------------------------- the run folder


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e}); it was damaged outside guidance-eval: fix it or "
                         "delete it (the finished checkpoints in state/ are kept and checked)") from None


LOCK_NAME = ".guidance-eval.lock"


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file; allowed: a new folder or a guidance-eval run folder")
    made = any(p.name != LOCK_NAME for p in out.iterdir()) if out.is_dir() else False
    if made and not (out / "settings.json").is_file():
        raise InputError(f"--out {str(out)!r} is a non-empty folder that no guidance-eval run made (no "
                         "settings.json); pass a new folder, or an earlier run's folder to resume it")
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--out {str(out)!r}: {existing} is not writable; pass a folder you can write to")


# Keys a run record gained later: a folder or checkpoint written before one of them existed is not refused for it.
ADDED_RUN_KEYS = ("pipeline_weights",)


def pipeline_weights(pipeline: str) -> str | None:
    """A fingerprint of the pipeline's weight files, so that a run folder or checkpoint made with other weights
    under the same name (a local folder retrained, a hub snapshot updated) is refused: each file's path and size,
    and a hash of its first and last MiB (cheap for multi-GB files; git clones and copies keep it). None where
    the files are not on this machine (a hub id not cached yet: the first run downloads it)."""
    import hashlib

    if pipeline == "embedded":
        from pipelines.embedded import WEIGHTS_DIR

        folder = WEIGHTS_DIR / "pipeline"
    elif Path(pipeline).is_dir():
        folder = Path(pipeline)
    else:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(pipeline, local_files_only=True))
        except Exception:  # not cached (or not a hub id): nothing to fingerprint yet
            return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder)}:{size}:".encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                digest.update(f.read())
    return digest.hexdigest()[:16]


def run_identity(spec: RunSpec) -> dict:
    """What decided a run's numbers: the spec's identity and the pipeline's weight files."""
    return {**spec.identity(), "pipeline_weights": pipeline_weights(spec.pipeline)}


def _differing(old: dict, new: dict, skip: tuple[str, ...] = ()) -> list[str]:
    keys = sorted((set(old) | set(new)) - set(skip))
    return [k for k in keys if old.get(k) != new.get(k) and not (k in ADDED_RUN_KEYS and k not in old)]


def _check_run_folder(out: Path, spec: RunSpec, dist: Dist) -> dict:
    """A run folder belongs to one set of run settings and one process count; it may gain strategy
    settings. Returns the settings record to write (the folder's, plus this spec's new settings)."""
    _check_out(out)
    settings_file = out / "settings.json"
    record = {"run": run_identity(spec), "settings": spec.settings_record()}
    if settings_file.is_file():
        previous = _read_json(settings_file)
        if not isinstance(previous, dict) or not isinstance(previous.get("run"), dict):
            raise InputError(f"{settings_file} was written by an older guidance-eval (or edited); use a new --out")
        old, new = previous["run"], record["run"]
        diff = [f"{k} (folder: {old.get(k)!r}, now: {new.get(k)!r})" for k in _differing(old, new)]
        started = (out / "results.json").is_file() or any((out / "state").glob("*.pt"))
        if diff and not started:
            # a start that failed before its first checkpoint (e.g. the sampler diverging in the first batch, or
            # a refusal at the first step of a pipeline the probe cannot stop): nothing to keep, so the corrected
            # command may take the folder over
            _log(f"{settings_file}: no setting was started with the folder's settings; using the new ones")
            previous = {"run": new, "settings": {}}
            diff = []
        if diff:
            raise InputError(f"run folder {out} was made with other settings (differing: {'; '.join(diff)}); "
                             "rerun with the folder's values, or use a new --out")
        settings = dict(previous.get("settings") or {})
        for key, value in record["settings"].items():
            if key in settings and settings[key] != value:
                raise InputError(f"run folder {out} already holds setting {key!r} with strategy "
                                 f"{settings[key]['strategy']!r}; now {value['strategy']!r}: give the changed "
                                 "spec a new label, or use a new --out")
            settings[key] = value
        record["settings"] = settings
    # Each process resumes its own shard: the shards only line up with the same number of processes.
    others = sorted({p.name.split(".rank")[1][:-3] for p in (out / "state").glob("*.rank*-of-*.pt")}
                    - {f"{r}-of-{dist.world_size}" for r in range(dist.world_size)})
    if others:
        raise InputError(f"run folder {out} holds checkpoints of a run with another number of processes "
                         f"({', '.join(others)}); relaunch with that number, or use a new --out folder")
    return record


# ----------------------------------------------------------------------------------------------- checkpoints


@dataclass
class SettingProgress:
    done_batches: int = 0
    nfe_sum: float = 0.0
    guide_nfe_sum: float = 0.0  # the guide model's evaluations (autoguidance), counted apart from nfe_sum
    perturbed_nfe_sum: float = 0.0  # the perturbed denoiser's evaluations (PAG, SLG, SEG, ...), apart too
    seconds: float = 0.0
    grid: list = field(default_factory=list)


def _check_checkpoint_run(path: Path, saved: Any, run: dict | None) -> None:
    """A checkpoint records the run settings that decided its content (seed, pipeline, steps, scheduler,
    reference, ...): one made by another run (a file copied between folders) is refused, naming what differs.
    Checkpoints written before this record have none; the run folder's settings.json vouches for those."""
    if run is None or not isinstance(saved, dict) or not isinstance(saved.get("run"), dict):
        return
    other = saved["run"]
    # num_images may grow: image i's seed and condition do not depend on it, so the first batches are the same
    # (benchmarks/effects.py continues a row from N = 500 to 2,000 this way).
    diff = [f"{k} (checkpoint: {other.get(k)!r}, this run: {run.get(k)!r})"
            for k in _differing(other, run, skip=("num_images",))]
    if diff:
        raise InputError(f"{path} was made by a run with other settings (differing: {'; '.join(diff)}); its numbers "
                         "are not this run's: delete it to recompute the setting, or use the run folder it came from")


def _load_checkpoint(path: Path, suite: MetricSuite, setting: dict, num_batches: int,
                     uses_guide: bool = False, run: dict | None = None,
                     uses_perturbed: bool = False) -> SettingProgress | None:
    """The saved progress, loaded into ``suite``; None (with a message) when there is none or it is unusable.

    Checkpoints written before guide-model counting have no "guide_nfe_sum": 0 for a setting without a
    guide model; a setting with one is recomputed (its guide evaluations were not counted). A checkpoint of
    another run (`run`: this run's `run_identity`) is an InputError, not a resumption."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        saved = None  # unreadable: handled below as corrupt
    _check_checkpoint_run(path, saved, run)
    try:
        if saved is None:
            raise ValueError("unreadable")
        if saved.get("version") != CHECKPOINT_VERSION or saved.get("setting") != setting:
            _log(f"{path}: made for another setting or by another version; recomputing this setting")
            return None
        done = int(saved["done_batches"])
        if not 0 <= done <= num_batches:
            raise ValueError(f"done_batches={done} is outside 0..{num_batches}")
        if "guide_nfe_sum" not in saved and uses_guide:
            _log(f"{path}: written before guide-model evaluations were counted; recomputing this setting")
            return None
        if "perturbed_nfe_sum" not in saved and uses_perturbed:
            _log(f"{path}: written before perturbed evaluations were counted; recomputing this setting")
            return None
        suite.load_state_dict(saved["metrics"])
        return SettingProgress(done, float(saved["nfe_sum"]), float(saved.get("guide_nfe_sum", 0.0)),
                               float(saved.get("perturbed_nfe_sum", 0.0)), float(saved["seconds"]),
                               list(saved["grid"]))
    except Exception as e:  # truncated, zero bytes, not a checkpoint, states of other shapes: all recomputed
        suite.reset()
        _log(f"{path} is corrupt or truncated ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
             "recomputing this setting from its first batch")
        return None


def _save_checkpoint(path: Path, suite: MetricSuite, setting: dict, prog: SettingProgress,
                     run: dict | None = None) -> None:
    atomic_save({"version": CHECKPOINT_VERSION, "setting": setting, "run": run, "metrics": suite.state_dict(),
                 "done_batches": prog.done_batches, "nfe_sum": prog.nfe_sum,
                 "guide_nfe_sum": prog.guide_nfe_sum, "perturbed_nfe_sum": prog.perturbed_nfe_sum,
                 "seconds": prog.seconds,
                 "grid": prog.grid}, path)


# ------------------------------------------------------------------------------------------------- the run


class Progress:
    """One line for the whole run: setting k of N, images done over all settings, total ETA (tqdm)."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm  # plain text bars: tqdm.auto wants ipywidgets in notebooks

        self.bar = tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True, smoothing=0.1)

    def start(self, k: int, n: int, key: str, already: int) -> None:
        self.bar.set_description(f"setting {k}/{n} {key}")
        # Images finished before this launch: counted, but not in the rate (they took no time now).
        self.bar.n += already
        self.bar.last_print_n = self.bar.n
        self.bar.refresh()

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def run_setting(spec: RunSpec, source: Source, key: str, strategy_config: dict | None, scale: float,
                state_path: Path, progress: Progress | None = None, dist: Dist = Dist(), device: str | None = None,
                checkpoint_seconds: float = CHECKPOINT_SECONDS, run: dict | None = None) -> dict:
    """One setting, resumed from its checkpoint. run: the run's `run_identity(spec)` when the caller has it (the
    weights fingerprint reads the weight files), else computed here."""
    from pipelines import apply_guidance

    device = device or spec.device
    suite = MetricSuite(spec.metrics, source.inputs, torch.device(device), spec.num_images)
    shard = dist.shard(spec.num_images)
    # Every process runs the same number of loop iterations (a shorter shard idles through the last
    # one) so that the per-batch reductions stay in step.
    num_batches = math.ceil(math.ceil(spec.num_images / dist.world_size) / spec.batch_size)
    setting = {"key": key, "strategy": strategy_config, "scale": scale}
    uses_guide, uses_perturbed = _uses_guide_model(strategy_config), _uses_perturbed(strategy_config)
    run = run_identity(spec) if run is None else run
    prog = _load_checkpoint(state_path, suite, setting, num_batches, uses_guide, run, uses_perturbed)
    # All processes must resume at the same batch: if one lost its checkpoint, all start this setting over.
    if dist.world_size > 1 and dist.min(-1 if prog is None else prog.done_batches) != dist.max(
            -1 if prog is None else prog.done_batches):
        _log(f"{key}: the processes' checkpoints disagree; recomputing this setting on every process")
        suite.reset()
        prog = None
    prog = prog or SettingProgress()
    if progress is not None:
        progress.start(*progress_position(spec, key), int(dist.sum(len(shard[: prog.done_batches * spec.batch_size]))))
    last_save, saved_batches = time.monotonic(), prog.done_batches
    try:
        for b in range(prog.done_batches, num_batches):
            indices = shard[b * spec.batch_size:(b + 1) * spec.batch_size]
            if indices:
                images, nfe, guide_nfe, perturbed_nfe, seconds = _generate(source, spec, strategy_config, scale,
                                                                           indices, device, apply_guidance)
                prog.seconds += seconds
                suite.update(images.to(device), source.labels(indices), source.prompts(indices),
                             torch.tensor(indices))
                prog.nfe_sum += nfe
                prog.guide_nfe_sum += guide_nfe
                prog.perturbed_nfe_sum += perturbed_nfe
                room = spec.grid_size - sum(len(g) for g in prog.grid)
                if room > 0:
                    prog.grid.append(images[:room].cpu())
            prog.done_batches = b + 1
            # One reduction per batch carries both the progress count and rank 0's decision to checkpoint,
            # so that all processes checkpoint at the same batch.
            due = dist.is_main and time.monotonic() - last_save >= checkpoint_seconds
            count, save = dist.sum_many([len(indices), float(due)])
            if save or b + 1 == num_batches:
                _save_checkpoint(state_path, suite, setting, prog, run)
                last_save, saved_batches = time.monotonic(), prog.done_batches
            if progress is not None:
                progress.update(int(count))
    except KeyboardInterrupt:
        # Ctrl-C: keep the finished batches. (Not under several processes: they may stop at different
        # batches, and their checkpoints must agree.)
        if dist.world_size == 1 and prog.done_batches > saved_batches:
            _save_checkpoint(state_path, suite, setting, prog, run)
        raise
    metrics = suite.compute()  # torchmetrics reduces the states over all processes here
    nfe_sum, guide_nfe_sum, seconds = dist.sum(prog.nfe_sum), dist.sum(prog.guide_nfe_sum), dist.sum(prog.seconds)
    row = {"setting": key, "label": key.rsplit("@", 1)[0], "scale": scale, "strategy": strategy_config,
           "num_images": spec.num_images, **metrics,
           "nfe_per_image": nfe_sum / spec.num_images, "seconds_per_image": seconds / spec.num_images}
    if uses_guide:
        # The guide model's evaluations, apart from the denoiser's nfe_per_image. Only settings with a guide
        # model carry the key, so rows of older runs and of other strategies are unchanged (readers: 0).
        row["guide_nfe_per_image"] = guide_nfe_sum / spec.num_images
    if uses_perturbed:  # likewise the perturbed denoiser's evaluations (PAG, SLG, SEG, ...)
        row["perturbed_nfe_per_image"] = dist.sum(prog.perturbed_nfe_sum) / spec.num_images
    return {"row": row, "grid": torch.cat(prog.grid) if prog.grid else None, "describe": suite.describe()}


def progress_position(spec: RunSpec, key: str) -> tuple[int, int, str]:
    keys = [k for k, _, _ in spec.settings()]
    return keys.index(key) + 1, len(keys), key


def _uses_guide_model(strategy_config: dict | None) -> bool:
    """Whether the setting's strategy evaluates a guide model (autoguidance), whose NFE is reported apart."""
    if strategy_config is None:
        return False
    from pipelines.guide import uses_guide_model

    return uses_guide_model(from_config(strategy_config))


def _uses_perturbed(strategy_config: dict | None) -> bool:
    """Whether the setting's strategy evaluates a perturbed denoiser (PAG, SLG, SEG, ...), counted apart."""
    if strategy_config is None:
        return False
    from pipelines.hook import _strategy_tree

    return any(s.perturbation is not None for s in _strategy_tree(from_config(strategy_config)))


def _generate(source: Source, spec: RunSpec, strategy_config: dict | None, scale: float, indices: list[int],
              device: str, apply_guidance) -> tuple[torch.Tensor, int, int, int, float]:
    """(uint8 images, the denoiser's NFE, the guide model's NFE, the perturbed denoiser's NFE, seconds) for one
    batch of image indices."""
    start = time.perf_counter()
    guide_nfe = perturbed_nfe = 0
    if strategy_config is None:
        images = source.call(indices, scale, spec.steps, spec.seed, device)
        nfe = spec.steps * (2 if scale > 1 else 1) * len(indices)
    else:
        with apply_guidance(source.pipe, from_config(strategy_config)) as handle:
            images = source.call(indices, scale, spec.steps, spec.seed, device)
        nfe = int(handle.nfe.sum())
        guide_nfe = 0 if handle.guide_nfe is None else int(handle.guide_nfe.sum())
        perturbed_nfe = 0 if handle.perturbed_nfe is None else int(handle.perturbed_nfe.sum())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return images, nfe, guide_nfe, perturbed_nfe, time.perf_counter() - start


@dataclass
class Prepared:
    """A checked run: nothing written yet."""

    spec: RunSpec
    out: Path
    dist: Dist
    device: str
    source: Source
    record: dict


def _per_step_scales(config: Any, path: str = "params"):
    """(where, list) for every per-step scale list in a strategy config (nested strategies included)."""
    if isinstance(config, dict):
        for key, value in (config.get("params") or {}).items():
            if key in ("scale", "scale_2") and isinstance(value, list):
                yield f"{config.get('name')} {path}.{key}", value
            elif isinstance(value, dict):
                yield from _per_step_scales(value, f"{path}.{key}.params")


def _check_steps(spec: RunSpec, pipe: Any) -> None:
    """What only the loaded pipeline can tell, checked before anything is written: the step count its
    scheduler allows, and per-step scale lists one entry per step (first-order schedulers)."""
    scheduler = getattr(pipe, "scheduler", None)
    trained = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    if isinstance(trained, int) and spec.steps > trained:
        raise InputError(f"--steps {spec.steps}: {type(scheduler).__name__} allows at most {trained} "
                         f"(the model's training timesteps)")
    if getattr(scheduler, "order", 1) != 1:
        return  # two-stage solvers make a scheduler-specific number of evaluations; the strategy checks it
    for key, config, _ in spec.settings():
        for where, scales in _per_step_scales(config):
            if len(scales) != spec.steps:
                raise InputError(f"setting {key!r}: {where} has {len(scales)} entries but --steps is {spec.steps}; "
                                 "allowed: one scale per step")


class _FirstStepDone(Exception):
    """Raised by the probe's step callback: the first step ran, nothing more is needed."""


def _probe_first_step(spec: RunSpec, source: Source, device: str) -> None:
    """Run each guided setting for one denoising step of one image, so that the refusals only a running
    step can detect (an x0-space strategy on an EDM-preconditioned scheduler, a batch layout the hook does
    not know) are input errors before anything is written, not failures after the run folder exists.
    Pipelines without `callback_on_step_end` are not probed (they can still refuse at their first step)."""
    import inspect

    from pipelines import apply_guidance

    if "callback_on_step_end" not in inspect.signature(source.pipe.__call__).parameters:
        return

    def stop(*_):
        raise _FirstStepDone

    for key, config, scale in spec.settings():
        if config is None:
            continue
        try:
            with apply_guidance(source.pipe, from_config(config)):
                source.call([0], scale, spec.steps, spec.seed, device, callback_on_step_end=stop)
        except _FirstStepDone:
            continue
        except ValueError as e:  # the strategy's or the hook's refusal (UnsupportedScheduler is one)
            raise InputError(f"setting {key!r}: {' '.join(str(e).split())}") from None


def prepare(spec: RunSpec, out: str | Path, source: Source | None = None) -> Prepared:
    """Check the spec, the output folder, the device, the reference, the pipeline and the metrics;
    write nothing. Every refusal is an InputError naming the input and the fix."""
    out = Path(out)
    check_device(spec.device)
    dist, device = init_distributed(spec.device)
    if spec.num_images < dist.world_size:
        raise InputError(f"num_images={spec.num_images} is below the number of processes ({dist.world_size})")
    record = _check_run_folder(out, spec, dist)
    source = source or load_source(spec, device=device)
    _check_steps(spec, source.pipe)
    MetricSuite(spec.metrics, source.inputs, torch.device(device), spec.num_images)  # its own checks
    _probe_first_step(spec, source, device)
    return Prepared(spec, out, dist, device, source, record)


def execute(job: Prepared, progress: bool = True, checkpoint_seconds: float = CHECKPOINT_SECONDS) -> list[dict]:
    """Evaluate every setting into the folder; returns this spec's result rows. results.json (and the report
    made from it) keeps every finished setting of the folder, earlier runs' included."""

    out, dist = job.out, job.dist
    with contextlib.ExitStack() as held:
        if dist.is_main:
            held.enter_context(_one_writer(out))
            (out / "state").mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_tmp(out):
                _log(f"removed {stale}, a partial file left by an interrupted run")
            atomic_write_text(out / "settings.json", json.dumps(job.record, indent=2))
        return _execute_settings(job, progress, checkpoint_seconds)


@contextlib.contextmanager
def _one_writer(out: Path):
    """The run folder has one writer: a second run started on it (before, it deleted the first one's live .tmp
    files as 'left by an interrupted run') is refused while the first holds the lock."""
    from filelock import FileLock, Timeout  # installed with huggingface_hub

    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise InputError(f"run folder {out} is being written by another guidance-eval run (it holds "
                         f"{out / LOCK_NAME}); wait for it to finish, or use another --out") from None
    try:
        yield
    finally:
        lock.release()


def _previous_rows(out: Path) -> dict[str, dict]:
    """The finished rows of the folder's earlier runs (results.json), by setting, so that a run with another
    spec list keeps them in its results instead of dropping them."""
    path = out / "results.json"
    if not path.is_file():
        return {}
    rows = _read_json(path).get("rows") or []
    return {r["setting"]: r for r in rows if isinstance(r, dict) and "setting" in r}


def _execute_settings(job: Prepared, progress: bool, checkpoint_seconds: float) -> list[dict]:
    from .report import write_grid, write_report

    spec, out, dist = job.spec, job.out, job.dist
    dist.barrier()
    finished = _previous_rows(out) if dist.is_main else {}
    order = list(job.record.get("settings") or {})  # the folder's settings, earlier runs' first
    rows, describe = [], {}
    bar = Progress(len(spec.settings()) * spec.num_images, progress and dist.is_main)
    try:
        for key, config, scale in spec.settings():
            state_path = out / "state" / f"{safe_name(key)}.rank{dist.rank}-of-{dist.world_size}.pt"
            result = run_setting(spec, job.source, key, config, scale, state_path, bar, dist, job.device,
                                 checkpoint_seconds, run=job.record["run"])  # fingerprinted once, in prepare
            rows.append(result["row"])
            describe = result["describe"] or describe
            if "clip_score" in describe and job.source.by_class:
                describe["clip_score"]["captions"] = "a photo of a {class name}, from the class label"
            if not dist.is_main:
                continue
            if result["grid"] is not None:
                write_grid(result["grid"], out / "grids" / f"{safe_name(key)}.png")
            finished[key] = result["row"]
            kept = [finished[k] for k in order if k in finished] + [r for k, r in finished.items() if k not in order]
            atomic_write_text(out / "results.json", json.dumps(
                {"settings": spec.identity(), "metrics": describe, "rows": kept, "processes": dist.world_size},
                indent=2))
    finally:
        bar.close()
    if dist.is_main:
        write_report(out)
    dist.barrier()
    return rows


def run(spec: RunSpec, out: str | Path, progress: bool = True, source: Source | None = None,
        checkpoint_seconds: float = CHECKPOINT_SECONDS) -> list[dict]:
    """Evaluate every setting of `spec` into `out`; returns the result rows (also written to disk)."""
    return execute(prepare(spec, out, source), progress, checkpoint_seconds)
