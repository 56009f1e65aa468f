"""Evaluation metrics for guidance experiments: FID / KID / precision-recall on the TF Inception, CLIP score,
colour saturation and class accuracy. Metric code knows neither guidance strategies nor pipelines.

Names are imported on first use (PEP 562), so `guidance-eval --help` does not pay for torch and its friends.
"""

from __future__ import annotations

import importlib
import sys
import types

_EXPORTS = {
    "class_accuracy": ["ClassAccuracy"],
    "clip_score": ["ClipScore", "OpenClipBackend", "TransformersClipBackend", "clip_scores"],
    "fid": ["FeatureMoments", "ReferenceStats", "compute_reference_stats", "frechet_distance", "psd_factor",
            "sqrtm_psd", "trace_sqrt_product"],
    "images": ["iter_image_batches", "list_image_files"],
    "inception": ["INCEPTION_ENV", "PRESETS", "InceptionFeatures", "default_inception_path", "no_tf32",
                  "preprocess", "resize_clean", "resize_legacy_pytorch", "resize_legacy_tf",
                  "resolve_inception_path", "torchscript_to_fidelity_state_dict"],
    "kid": ["kernel_distance", "polynomial_mmd"],
    "metrics": ["FeatureMetrics", "InceptionMetrics"],
    "precision_recall": ["knn_radii", "precision_recall"],
    "saturation": ["Saturation", "colourfulness", "hsv_saturation"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    # Importing the submodule `evaluation.precision_recall` sets an attribute of that name on the package,
    # which would hide the function `precision_recall` exported under the same name.
    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and name in _MODULE_OF:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
