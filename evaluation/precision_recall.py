"""Improved precision and recall (Kynkaanniemi et al. 2019): k-NN balls around each sample, k = 3.

precision = share of fake samples inside some real sample's ball (radius: distance to its k-th real neighbour);
recall = share of real samples inside some fake sample's ball. Same rule (``<=``, the sample itself counted as
its 0-th neighbour) as torch-fidelity's ``prc`` and the NVlabs / ADM implementations. Distances are squared
Euclidean in float64 and computed in row blocks, so ties are not decided by fp16/TF32 rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _squared_distances(a: Tensor, b: Tensor, b_norms: Tensor) -> Tensor:
    return (a.square().sum(1, keepdim=True) + b_norms - 2 * a @ b.T).clamp_min(0)


def knn_radii(features: Tensor, k: int = 3, block_size: int = 4096) -> Tensor:
    """Squared distance of each sample to its k-th nearest other sample (float64)."""
    f = features.double()
    norms = f.square().sum(1)
    return torch.cat([_squared_distances(block, f, norms).kthvalue(k + 1, dim=1).values
                      for block in f.split(block_size)])


def manifold_coverage(queries: Tensor, support: Tensor, support_radii: Tensor, block_size: int = 4096) -> Tensor:
    """Share of ``queries`` inside at least one k-NN ball of ``support``."""
    s = support.double()
    norms = s.square().sum(1)
    inside = [(_squared_distances(block, s, norms) <= support_radii).any(1)
              for block in queries.double().split(block_size)]
    return torch.cat(inside).double().mean()


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, block_size: int = 4096,
                     real_radii: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(precision, recall); pass ``real_radii`` (from ``knn_radii``) to reuse them across evaluations."""
    real_radii = knn_radii(real, k, block_size) if real_radii is None else real_radii
    precision = manifold_coverage(fake, real, real_radii, block_size)
    recall = manifold_coverage(real, fake, knn_radii(fake, k, block_size), block_size)
    return precision, recall
