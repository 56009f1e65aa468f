"""One pass of images feeds FID, KID and precision/recall (as EDM2's calculate_metrics does for its detectors).

Written on torchmetrics' ``Metric`` (states, reset, device moves, distributed sync) rather than reusing
torchmetrics' FID/KID classes: those cannot take precomputed reference statistics, compute the trace term with
the slow general ``eigvals``, re-run their own Inception per metric, and (KID) keep float32 kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from .fid import FeatureMoments, ReferenceStats, frechet_distance
from .inception import InceptionFeatures
from .kid import kernel_distance
from .precision_recall import knn_radii, precision_recall

METRICS = ("fid", "kid", "pr")


class FeatureMetrics(FeatureMoments):
    """FID / KID / precision-recall of streamed features against a ``ReferenceStats`` (any feature space).

    FID streams float64 moments; KID and PR need the features themselves, so they are stored (float32) only
    when requested, and the reference must carry features (``compute_reference_stats(keep_features=True)``).
    """

    def __init__(self, reference: ReferenceStats, metrics: tuple[str, ...] = ("fid",), kid_subsets: int = 100,
                 kid_subset_size: int = 1000, kid_degree: int = 3, kid_seed: int = 0, pr_k: int = 3,
                 block_size: int = 4096, **kwargs):
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
        super().__init__(reference.feature_dim, **kwargs)
        self.reference = reference
        self.metric_names = tuple(metrics)
        self.kid_args = dict(subsets=kid_subsets, subset_size=kid_subset_size, degree=kid_degree, seed=kid_seed)
        self.pr_k, self.block_size = pr_k, block_size
        self.stores_features = "kid" in metrics or "pr" in metrics
        if self.stores_features:
            if reference.features is None:
                raise ValueError("KID and precision/recall need reference features: compute the reference "
                                 "with keep_features=True (`guidance-eval stats --keep-features 2000`)")
            # KID's unbiased MMD needs 2 reference samples, PR a k-th neighbour among them; refused now,
            # not when the metrics are computed at the end of a run.
            need = max(2 if "kid" in metrics else 0, pr_k + 1 if "pr" in metrics else 0)
            if reference.features.shape[0] < need:
                raise ValueError(f"the reference keeps {reference.features.shape[0]} features; "
                                 f"{'/'.join(m for m in metrics if m != 'fid')} need at least {need}")
            self.add_state("features", [], dist_reduce_fx="cat")
            # Image index of each stored feature: features gathered from several processes are put back in
            # index order, so KID's random subsets see the same matrix as a single-process run.
            self.add_state("indices", [], dist_reduce_fx="cat")

    def update(self, features: Tensor, indices: Tensor | None = None) -> None:
        super().update(features)
        if self.stores_features:
            device = self.feature_sum.device
            if indices is None:
                start = sum(len(f) for f in self.features)
                indices = torch.arange(start, start + features.shape[0])
            self.features.append(features.detach().float().to(device))
            self.indices.append(torch.as_tensor(indices, dtype=torch.long).to(device))

    def stored_features(self) -> Tensor:
        """The stored features in image-index order."""
        features, indices = dim_zero_cat(self.features), dim_zero_cat(self.indices)
        return features[indices.argsort()]

    def _reference_features(self, device: torch.device) -> Tensor:
        key = ("features", str(device))
        cache = self.reference._cache
        if key not in cache:
            cache[key] = self.reference.features.to(device)
        return cache[key]

    def _reference_radii(self, device: torch.device) -> Tensor:
        key = ("radii", self.pr_k, str(device))  # one k-NN pass over the reference, reused by every evaluation
        cache = self.reference._cache
        if key not in cache:
            cache[key] = knn_radii(self._reference_features(device), self.pr_k, self.block_size)
        return cache[key]

    def compute(self) -> dict[str, float]:
        device = self.feature_sum.device
        out: dict[str, float] = {"num_samples": int(self.num_samples)}
        if "fid" in self.metric_names:
            mu, sigma = self.moments()
            ref_mu, ref_sigma = self.reference.on(device)
            out["fid"] = float(frechet_distance(ref_mu, ref_sigma, mu, sigma, self.reference.sigma_factor(device)))
            # A distance is >= 0; below -1e-4 of the traces it is not rounding but broken statistics.
            if not math.isfinite(out["fid"]) or out["fid"] < -1e-4 * float(ref_sigma.trace() + sigma.trace()):
                raise ValueError(f"FID came out {out['fid']!r}, which no distance can be: the generated features or "
                                 "the reference statistics are broken (NaN, inf, or not a covariance)")
        if self.stores_features:
            fake, real = self.stored_features(), self._reference_features(device)
        if "kid" in self.metric_names:
            mean, std = kernel_distance(real, fake, **self.kid_args)
            out["kid_mean"], out["kid_std"] = float(mean), float(std)
        if "pr" in self.metric_names:
            precision, recall = precision_recall(real, fake, self.pr_k, self.block_size, self._reference_radii(device))
            out["precision"], out["recall"] = float(precision), float(recall)
        return out


class InceptionMetrics(FeatureMetrics):
    """``update(uint8 images)`` extracts Inception features once and feeds FID, KID and PR.

    The reference must come from the same preset and extractor (checked), e.g.
    ``compute_reference_stats("test.npz", InceptionFeatures(), keep_features=True)``.
    """

    def __init__(self, reference: ReferenceStats, extractor: InceptionFeatures | None = None,
                 metrics: tuple[str, ...] = ("fid",), **kwargs):
        extractor = extractor if extractor is not None else InceptionFeatures()
        for name in ("preset", "extractor_id"):
            ours, theirs = getattr(extractor, name), getattr(reference, name)
            if ours != theirs:
                raise ValueError(f"reference statistics use {name} {theirs!r}, the extractor {ours!r}")
        if reference.feature_dim != extractor.feature_dim:
            raise ValueError(f"reference statistics are {reference.feature_dim}-d, "
                             f"the extractor gives {extractor.feature_dim}-d features")
        super().__init__(reference, metrics, **kwargs)
        self.extractor = extractor
        self.to(extractor.device)

    def update(self, images: Tensor, indices: Tensor | None = None) -> None:
        super().update(self.extractor(images), indices)

    def describe(self) -> dict:
        return {**self.extractor.describe(), "metrics": list(self.metric_names), "reference_n": self.reference.n,
                "kid": self.kid_args, "pr_k": self.pr_k}
