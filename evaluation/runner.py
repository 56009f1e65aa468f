"""The batch evaluation runner: the one place that wires a pipeline, strategies and metrics.

For every setting (a strategy configuration at one guidance scale) it generates N images in
batches, streams them into the metrics (images are never all held in memory), and after every
batch checkpoints the metric states to `<out>/state/<setting>.pt`. A run killed at any moment,
restarted with the same command, resumes after the last finished batch and ends with the same
numbers: image i always gets seed (seed, i) and condition i, whatever the batch it falls in.

Strategy specs (JSON): {"label": "APG", "strategy": {"name": "APG", "params": {...}}, "scales": [3, 5]}.
`"strategy": null` runs the pipeline's own CFG with no hook (the native baseline). The scale is
passed as the pipeline call's own guidance scale; strategies whose scale is None take it.

Under torchrun / accelerate launch every process takes the image indices i % world_size == rank,
checkpoints to its own `<setting>.rank<r>-of-<w>.pt`, and only rank 0 writes results, grids (from its
own images) and plots; metric states are reduced across processes when computed.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from guidance import from_config

from .distributed import Dist, init_distributed
from .suite import MetricSuite, SuiteInputs, check_metrics

DEFAULT_STATS_DIR = Path(__file__).resolve().parent / "stats"
# Shipped statistics by name (our FID code, legacy_tf preset): the test split is the embedded
# model's default; the train split is the usual CIFAR-10 reference of papers (ADM, EDM: 50k train).
SHIPPED_REFERENCES = {
    "cifar10-test": DEFAULT_STATS_DIR / "cifar10_test_legacy_tf.npz",
    "cifar10-train": DEFAULT_STATS_DIR / "cifar10_train_legacy_tf.npz",
}
EMBEDDED_REFERENCE = SHIPPED_REFERENCES["cifar10-test"]
TIMING_KEYS = ("seconds_per_image",)


@dataclass
class StrategySpec:
    label: str
    strategy: dict | None  # a guidance config (to_config() form), or None for the native pipeline
    scales: list[float]

    @classmethod
    def parse(cls, item: Any) -> "StrategySpec":
        if not isinstance(item, dict) or "label" not in item or "scales" not in item or "strategy" not in item:
            raise ValueError(f"strategy spec {item!r} is malformed; allowed: "
                             '{"label": str, "strategy": {"name": ..., "params": {...}} or null, "scales": [numbers]}')
        scales = item["scales"] if isinstance(item["scales"], list) else [item["scales"]]
        if not scales or not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scales):
            raise ValueError(f"strategy spec {item['label']!r}: scales={item['scales']!r}; allowed: a list of numbers")
        if item["strategy"] is not None:
            from_config(item["strategy"])  # fail now on a malformed configuration, not after hours of sampling
        return cls(str(item["label"]), item["strategy"], [float(s) for s in scales])


@dataclass
class RunSpec:
    strategies: list[StrategySpec]
    pipeline: str = "embedded"
    class_labels: list[int] | None = None
    prompts: list[str] | None = None
    num_images: int = 100
    batch_size: int = 50
    seed: int = 0
    steps: int = 50
    scheduler: str | None = None
    metrics: tuple[str, ...] = ("fid", "saturation", "class_accuracy")
    reference: str | None = None
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    grid_size: int = 64

    def __post_init__(self) -> None:
        self.metrics = check_metrics(self.metrics)
        for name in ("num_images", "batch_size", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= 1")

    def settings(self) -> list[tuple[str, dict | None, float]]:
        return [(f"{s.label}@{scale:g}", s.strategy, scale) for s in self.strategies for scale in s.scales]

    def identity(self) -> dict:
        """What must match for a run folder to be resumed (the device may change; checkpoints count batches,
        so the batch size may not)."""
        d = asdict(self)
        d.pop("device")
        d["metrics"] = list(self.metrics)
        return json.loads(json.dumps(d))


def image_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@dataclass
class Source:
    """A loaded pipeline plus what the metrics need from it."""

    pipe: Any
    inputs: SuiteInputs
    conditions: list  # class ids or prompts, cycled over image indices
    by_class: bool

    def call(self, indices: list[int], scale: float, steps: int, seed: int, device: str) -> torch.Tensor:
        """uint8 (B, 3, H, W) images for these image indices."""
        gens = [torch.Generator(device=device if device != "mps" else "cpu").manual_seed(image_seed(seed, i))
                for i in indices]
        conds = [self.conditions[i % len(self.conditions)] for i in indices]
        kwargs: dict[str, Any] = {"num_inference_steps": steps, "generator": gens, "output_type": "pt"}
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
        return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)

    def labels(self, indices: list[int]) -> torch.Tensor | None:
        if not self.by_class:
            return None
        return torch.tensor([self.conditions[i % len(self.conditions)] for i in indices])

    def prompts(self, indices: list[int]) -> list[str] | None:
        return None if self.by_class else [self.conditions[i % len(self.conditions)] for i in indices]


def load_source(spec: RunSpec, clip_backend=None, classifier=None, device: str | None = None) -> Source:
    from .fid import ReferenceStats
    from .inception import InceptionFeatures

    device = device or spec.device
    needs_inception = any(m in spec.metrics for m in ("fid", "kid", "pr"))
    extractor = InceptionFeatures(device=device) if needs_inception else None
    reference = None
    if needs_inception:
        path = spec.reference or (EMBEDDED_REFERENCE if spec.pipeline == "embedded" else None)
        path = SHIPPED_REFERENCES.get(path, path)
        if path is None:
            raise ValueError("FID/KID/PR need reference statistics: pass --reference (see `guidance-eval stats`)")
        if not Path(path).is_file():
            raise FileNotFoundError(f"reference={str(path)!r} does not exist; compute it with `guidance-eval stats`")
        reference = ReferenceStats.load(path, feature_dim=extractor.feature_dim)
    if spec.pipeline == "embedded":
        from pipelines import load_embedded

        model = load_embedded(device, scheduler=spec.scheduler)
        labels = spec.class_labels if spec.class_labels is not None else list(range(model.pipe.num_classes))
        inputs = SuiteInputs(reference, extractor, classifier or model.eval_classifier, model.pipe.num_classes,
                             clip_backend)
        return Source(model.pipe, inputs, labels, by_class=True)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(spec.pipeline)
    if spec.scheduler:
        import diffusers

        pipe.scheduler = getattr(diffusers, spec.scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    by_class = spec.class_labels is not None
    conditions = spec.class_labels if by_class else spec.prompts
    if not conditions:
        raise ValueError("a hub or local pipeline needs --prompts FILE or --class-labels")
    inputs = SuiteInputs(reference, extractor, classifier, None, clip_backend)
    return Source(pipe, inputs, conditions, by_class)


def _save_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _check_run_folder(out: Path, spec: RunSpec, dist: Dist) -> None:
    """A run folder belongs to one set of settings and one process count; refuse to mix them."""
    settings_file = out / "settings.json"
    identity = spec.identity()
    if settings_file.is_file():
        previous = json.loads(settings_file.read_text())
        diff = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
        if diff:
            raise ValueError(f"run folder {out} was made with other settings (differing: {', '.join(diff)}); "
                             "use a new --out folder")
    elif dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        settings_file.write_text(json.dumps(identity, indent=2))
    # Each process resumes its own shard: the shards only line up with the same number of processes.
    others = sorted({p.name.split(".rank")[1][:-3] for p in (out / "state").glob("*.rank*-of-*.pt")}
                    - {f"{r}-of-{dist.world_size}" for r in range(dist.world_size)})
    if others:
        raise ValueError(f"run folder {out} holds checkpoints of a run with another number of processes "
                         f"({', '.join(others)}); relaunch with that number, or use a new --out folder")


@dataclass
class SettingProgress:
    done_batches: int = 0
    nfe_sum: float = 0.0
    seconds: float = 0.0
    grid: list = field(default_factory=list)


def run_setting(spec: RunSpec, source: Source, key: str, strategy_config: dict | None, scale: float,
                state_path: Path, progress: bool = True, dist: Dist = Dist(), device: str | None = None) -> dict:
    from pipelines import apply_guidance

    device = device or spec.device
    suite = MetricSuite(spec.metrics, source.inputs, torch.device(device), spec.num_images)
    prog = SettingProgress()
    if state_path.is_file():
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        suite.load_state_dict(saved["metrics"])
        prog = SettingProgress(int(saved["done_batches"]), float(saved["nfe_sum"]), float(saved["seconds"]),
                               list(saved["grid"]))
    shard = dist.shard(spec.num_images)
    # Every process runs the same number of loop iterations (a shorter shard idles through the last
    # one) so that the per-batch progress reduction stays in step.
    num_batches = math.ceil(math.ceil(spec.num_images / dist.world_size) / spec.batch_size)
    done = dist.sum(len(shard[: prog.done_batches * spec.batch_size]))
    bar = tqdm(total=spec.num_images, initial=int(done), desc=key, unit="img",
               disable=not (progress and dist.is_main), dynamic_ncols=True)
    for b in range(prog.done_batches, num_batches):
        indices = shard[b * spec.batch_size:(b + 1) * spec.batch_size]
        if indices:
            images, nfe, seconds = _generate(source, spec, strategy_config, scale, indices, device, apply_guidance)
            prog.seconds += seconds
            suite.update(images.to(device), source.labels(indices), source.prompts(indices), torch.tensor(indices))
            prog.nfe_sum += nfe
            room = spec.grid_size - sum(len(g) for g in prog.grid)
            if room > 0:
                prog.grid.append(images[:room].cpu())
        prog.done_batches = b + 1
        _save_atomic(state_path, {"metrics": suite.state_dict(), "done_batches": prog.done_batches,
                                  "nfe_sum": prog.nfe_sum, "seconds": prog.seconds, "grid": prog.grid})
        bar.update(int(dist.sum(len(indices))))
    bar.close()
    metrics = suite.compute()  # torchmetrics reduces the states over all processes here
    nfe_sum, seconds = dist.sum(prog.nfe_sum), dist.sum(prog.seconds)
    row = {"setting": key, "label": key.rsplit("@", 1)[0], "scale": scale, "strategy": strategy_config,
           "num_images": spec.num_images, **metrics,
           "nfe_per_image": nfe_sum / spec.num_images, "seconds_per_image": seconds / spec.num_images}
    return {"row": row, "grid": torch.cat(prog.grid) if prog.grid else None, "describe": suite.describe()}


def _generate(source: Source, spec: RunSpec, strategy_config: dict | None, scale: float, indices: list[int],
              device: str, apply_guidance) -> tuple[torch.Tensor, int, float]:
    """(uint8 images, NFE spent, seconds) for one batch of image indices."""
    start = time.perf_counter()
    if strategy_config is None:
        images = source.call(indices, scale, spec.steps, spec.seed, device)
        nfe = spec.steps * (2 if scale > 1 else 1) * len(indices)
    else:
        with apply_guidance(source.pipe, from_config(strategy_config)) as handle:
            images = source.call(indices, scale, spec.steps, spec.seed, device)
        nfe = int(handle.nfe.sum())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return images, nfe, time.perf_counter() - start


def run(spec: RunSpec, out: str | Path, progress: bool = True, source: Source | None = None) -> list[dict]:
    """Evaluate every setting of `spec` into `out`; returns the result rows (also written to disk)."""
    from .report import write_grid, write_report

    out = Path(out)
    dist, device = init_distributed(spec.device)
    if spec.num_images < dist.world_size:
        raise ValueError(f"num_images={spec.num_images} is below the number of processes ({dist.world_size})")
    _check_run_folder(out, spec, dist)
    dist.barrier()
    (out / "state").mkdir(parents=True, exist_ok=True)
    source = source or load_source(spec, device=device)
    rows, describe = [], {}
    for key, config, scale in spec.settings():
        state_path = out / "state" / f"{_safe(key)}.rank{dist.rank}-of-{dist.world_size}.pt"
        result = run_setting(spec, source, key, config, scale, state_path, progress, dist, device)
        rows.append(result["row"])
        describe = result["describe"] or describe
        if not dist.is_main:
            continue
        if result["grid"] is not None:
            write_grid(result["grid"], out / "grids" / f"{_safe(key)}.png")
        (out / "results.json").write_text(json.dumps({"settings": spec.identity(), "metrics": describe,
                                                      "rows": rows, "processes": dist.world_size}, indent=2))
    if dist.is_main:
        write_report(out)
    dist.barrier()
    return rows


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in key)
