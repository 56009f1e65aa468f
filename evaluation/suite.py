"""The metrics of one evaluated setting, fed from one stream of generated images.

`MetricSuite` wires the metric objects (which know nothing of pipelines) to the batch runner: one
`update(images, labels, prompts)` per batch, `compute()` at the end, and `state_dict()` /
`load_state_dict()` so that a run can checkpoint after every batch and resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from .class_accuracy import ClassAccuracy
from .clip_score import ClipScore
from .fid import ReferenceStats
from .inception import InceptionFeatures
from .metrics import InceptionMetrics
from .saturation import Saturation

METRIC_NAMES = ("fid", "kid", "pr", "saturation", "class_accuracy", "clip_score")


def check_metrics(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown or not names:
        raise ValueError(f"metrics={list(names)!r}: unknown {unknown}; allowed: {', '.join(METRIC_NAMES)}")
    return tuple(dict.fromkeys(names))


def metric_state(metric: Metric) -> dict[str, Tensor]:
    """A torchmetrics metric's states as tensors (list states concatenated), on the CPU."""
    out = {}
    for name, default in metric._defaults.items():
        value = getattr(metric, name)
        if isinstance(default, list):
            value = torch.cat(value) if value else torch.empty(0)
        out[name] = value.detach().cpu()
    out["_update_count"] = torch.tensor(metric._update_count)
    return out


def load_metric_state(metric: Metric, state: dict[str, Tensor]) -> None:
    device = metric.device
    for name, default in metric._defaults.items():
        value = state[name].to(device)
        setattr(metric, name, ([value] if value.numel() else []) if isinstance(default, list) else value)
    metric._update_count = int(state["_update_count"])
    metric._computed = None


@dataclass
class SuiteInputs:
    """What the metrics need besides images; built once per run and shared by every setting."""

    reference: ReferenceStats | None = None
    extractor: InceptionFeatures | None = None
    classifier: nn.Module | None = None
    num_classes: int | None = None
    clip_backend: nn.Module | None = None


class MetricSuite:
    def __init__(self, names: tuple[str, ...], inputs: SuiteInputs, device: torch.device, num_images: int):
        self.names = check_metrics(names)
        self.metrics: dict[str, Metric] = {}
        inception = [n for n in self.names if n in ("fid", "kid", "pr")]
        if inception:
            if inputs.reference is None or inputs.extractor is None:
                raise ValueError(f"metrics {inception} need reference statistics (--reference)")
            # KID subsets of 1000 (torch-fidelity / torchmetrics default), fewer for small runs.
            subset = min(1000, num_images, inputs.reference.n if inputs.reference.features is None
                         else inputs.reference.features.shape[0])
            self.metrics["inception"] = InceptionMetrics(inputs.reference, inputs.extractor, tuple(inception),
                                                         kid_subset_size=subset)
        if "saturation" in self.names:
            self.metrics["saturation"] = Saturation()
        if "class_accuracy" in self.names:
            if inputs.classifier is None:
                raise ValueError("metric class_accuracy needs a classifier (the embedded model has one; "
                                 "pass --classifier for other pipelines)")
            self.metrics["class_accuracy"] = ClassAccuracy(inputs.classifier, inputs.num_classes)
        if "clip_score" in self.names:
            if inputs.clip_backend is None:
                raise ValueError("metric clip_score needs CLIP weights (--clip-model / --clip-pretrained)")
            self.metrics["clip_score"] = ClipScore(inputs.clip_backend)
        for metric in self.metrics.values():
            metric.to(device)

    def update(self, images: Tensor, labels: Tensor | None = None, prompts: list[str] | None = None,
               indices: Tensor | None = None) -> None:
        """images: uint8 (B, 3, H, W); indices: their image indices (orders stored features)."""
        for key, metric in self.metrics.items():
            if key == "class_accuracy":
                metric.update(images, labels)
            elif key == "clip_score":
                metric.update(images, prompts)
            elif key == "inception":
                metric.update(images, indices)
            else:
                metric.update(images)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, metric in self.metrics.items():
            value = metric.compute()
            if key == "class_accuracy":
                out["class_accuracy"] = float(value["accuracy"])
            elif key == "clip_score":
                out["clip_score"] = float(value)
            elif key == "saturation":
                out.update({k: float(v) for k, v in value.items()})
            else:
                out.update({k: v for k, v in value.items() if k != "num_samples"})
        return out

    def describe(self) -> dict:
        info = {}
        for key, metric in self.metrics.items():
            if hasattr(metric, "describe"):
                info[key] = metric.describe()
        return info

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {key: metric_state(metric) for key, metric in self.metrics.items()}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        for key, metric in self.metrics.items():
            load_metric_state(metric, state[key])
