"""Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with k(x, y) = (gamma x.y + coef)^degree.

Subset sampling follows torchmetrics (per subset: a randperm of the real, then of the fake features), from a
private seeded generator, so results are reproducible and equal torchmetrics' after ``torch.manual_seed(seed)``.
Kernels are evaluated in float64: the MMD is a small difference of large kernel sums.
"""

from __future__ import annotations

import torch
from torch import Tensor


def polynomial_mmd(x: Tensor, y: Tensor, degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> Tensor:
    """Unbiased MMD^2 between equal-sized samples ``x`` and ``y`` (m, d) with the polynomial kernel."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    x, y = x.double(), y.double()
    m = x.shape[0]

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        return (a @ b.T * gamma + coef) ** degree

    def off_diagonal_sum(k: Tensor) -> Tensor:
        return k.sum() - k.diagonal().sum()

    within = off_diagonal_sum(kernel(x, x)) + off_diagonal_sum(kernel(y, y))
    return within / (m * (m - 1)) - 2 * kernel(x, y).sum() / m**2


def kernel_distance(real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
                    gamma: float | None = None, coef: float = 1.0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """KID mean and (population) std over ``subsets`` random subsets of ``subset_size``, as torchmetrics."""
    n_real, n_fake = real.shape[0], fake.shape[0]
    if subset_size > min(n_real, n_fake):
        raise ValueError(f"subset_size {subset_size} exceeds the sample counts (real {n_real}, fake {n_fake})")
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        r = real[torch.randperm(n_real, generator=generator)[:subset_size].to(real.device)]
        f = fake[torch.randperm(n_fake, generator=generator)[:subset_size].to(fake.device)]
        scores.append(polynomial_mmd(r, f, degree, gamma, coef))
    scores = torch.stack(scores)
    return scores.mean(), scores.std(unbiased=False)
