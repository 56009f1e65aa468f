"""The metrics of one evaluated setting, fed from one stream of generated images.

`MetricSuite` wires the metric objects (which know nothing of pipelines) to the batch runner: one
`update(images, labels, prompts)` per batch, `compute()` at the end, and `state_dict()` /
`load_state_dict()` (through torchmetrics' public `metric_state` / `merge_state`) so that a run can
checkpoint and resume exactly.
"""

from __future__ import annotations

import warnings
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
from .spec import METRIC_NAMES, InputError, check_metrics  # noqa: F401 (re-exported)



def metric_state(metric: Metric) -> dict[str, Tensor | list[Tensor]]:
    """A torchmetrics metric's states (its public ``metric_state``) on the CPU, list states as one tensor."""
    out: dict[str, Tensor | list[Tensor]] = {}
    for name, value in metric.metric_state.items():
        if isinstance(value, list):
            out[name] = [torch.cat(value).detach().cpu()] if value else []
        else:
            out[name] = value.detach().cpu()
    return out


def load_metric_state(metric: Metric, state: dict[str, Tensor | list[Tensor]]) -> None:
    """Restore saved states into a metric: reset, then torchmetrics' ``merge_state`` (sum / cat of the
    saved states into the defaults, i.e. the saved values exactly)."""
    metric.reset()
    expected = set(metric.metric_state)
    if set(state) != expected:
        raise ValueError(f"saved metric states {sorted(state)} do not match {type(metric).__name__}'s "
                         f"{sorted(expected)}")
    device = metric.device
    moved = {k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device) for k, v in state.items()}
    for name, default in metric.metric_state.items():
        if isinstance(default, Tensor) and moved[name].shape != default.shape:
            raise ValueError(f"saved state {name} has shape {tuple(moved[name].shape)}, "
                             f"{type(metric).__name__} needs {tuple(default.shape)}")
    metric.merge_state(moved)


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
                raise InputError(f"metrics {inception} need reference statistics (--reference)")
            # KID subsets of 1000 (torch-fidelity / torchmetrics default), fewer for small runs.
            subset = min(1000, num_images, inputs.reference.n if inputs.reference.features is None
                         else inputs.reference.features.shape[0])
            self.metrics["inception"] = InceptionMetrics(inputs.reference, inputs.extractor, tuple(inception),
                                                         kid_subset_size=subset)
        if "saturation" in self.names:
            self.metrics["saturation"] = Saturation()
        if "class_accuracy" in self.names:
            if inputs.classifier is None:
                raise InputError("metric class_accuracy needs a classifier: the embedded model has one; for "
                                 "other pipelines pass one to evaluation.runner.load_source(classifier=...)")
            self.metrics["class_accuracy"] = ClassAccuracy(inputs.classifier, inputs.num_classes)
        if "clip_score" in self.names:
            if inputs.clip_backend is None:
                raise InputError("metric clip_score needs CLIP weights: "
                                 "--clip-model NAME --clip-pretrained TAG_OR_FILE")
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
            with warnings.catch_warnings():
                # A setting resumed from a finished checkpoint has merged states but no update in this
                # process; torchmetrics warns about that although the states are complete.
                warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
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
        if set(state) != set(self.metrics):
            raise ValueError(f"saved metrics {sorted(state)} are not this suite's {sorted(self.metrics)}")
        for key, metric in self.metrics.items():
            load_metric_state(metric, state[key])

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()
