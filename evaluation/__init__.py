"""Evaluation metrics for guidance experiments: FID / KID / precision-recall on the TF Inception, CLIP score,
colour saturation and class accuracy. Metric code knows neither guidance strategies nor pipelines."""

from .class_accuracy import ClassAccuracy
from .clip_score import ClipScore, OpenClipBackend, TransformersClipBackend, clip_scores
from .fid import (FeatureMoments, ReferenceStats, compute_reference_stats, frechet_distance, sqrtm_psd,
                  trace_sqrt_product)
from .images import iter_image_batches, list_image_files
from .inception import (INCEPTION_ENV, PRESETS, InceptionFeatures, default_inception_path, no_tf32, preprocess,
                        resize_clean, resize_legacy_pytorch, resize_legacy_tf, resolve_inception_path,
                        torchscript_to_fidelity_state_dict)
from .kid import kernel_distance, polynomial_mmd
from .metrics import FeatureMetrics, InceptionMetrics
from .precision_recall import knn_radii, precision_recall
from .saturation import Saturation, colourfulness, hsv_saturation

__all__ = [
    "ClassAccuracy", "ClipScore", "OpenClipBackend", "TransformersClipBackend", "clip_scores",
    "FeatureMoments", "ReferenceStats", "compute_reference_stats", "frechet_distance", "sqrtm_psd",
    "trace_sqrt_product", "iter_image_batches", "list_image_files", "INCEPTION_ENV", "PRESETS",
    "InceptionFeatures", "default_inception_path", "no_tf32", "preprocess", "resize_clean",
    "resize_legacy_pytorch", "resize_legacy_tf", "resolve_inception_path", "torchscript_to_fidelity_state_dict",
    "kernel_distance", "polynomial_mmd", "FeatureMetrics", "InceptionMetrics", "knn_radii", "precision_recall",
    "Saturation", "colourfulness", "hsv_saturation",
]
