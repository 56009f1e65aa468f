"""95% intervals for the effects measurement (`effects.py`, `effects_report.py`).

* class accuracy, precision, recall: Wilson score interval for one proportion; Newcombe's hybrid
  (method 10) for the difference of two. Rows of the effects run share their seeds, so the images
  of two rows are positively correlated and the independent-sample Newcombe interval is wider than
  a paired one: conservative, never the other way.
* FID, mean saturation, precision: bootstrap over generated images, normal interval (estimate +-
  1.96 bootstrap standard errors). Not the percentile interval: FID's bias grows as a replicate's
  distinct images shrink, so its replicates sit above the estimate (N = 50: +29) and a percentile
  interval can miss the estimate itself. The interval is for the FID of N images; rows are
  compared at equal N only, where the bias is nearly common. Replicate b draws
  the same multiset of image indices in every row of the same N (`bootstrap_counts`), so the
  difference of two rows' replicates is a paired bootstrap of their difference.

FID replicates use the N x N form of the trace term: for features X (N, d) with multiplicities c,
the nonzero eigenvalues of sqrt(S_ref) S_c sqrt(S_ref) are those of D (X - mu_c) S_ref (X - mu_c)^T
D / (n - 1), D = diag(sqrt c); one Gram matrix X S_ref X^T serves every replicate (for N up to
about 3,000: a 1,300-square eigvalsh per replicate at N = 2,000 instead of a 2,048-square one plus a
d x d x N product). Larger N uses the d x d form; both run on the features' device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from evaluation.fid import psd_factor

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson: successes={successes}, n={n}; allowed: n >= 1, 0 <= successes <= n")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(s1: int, n1: int, s2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Interval of p1 - p2 (Newcombe 1998, method 10: from the two Wilson intervals)."""
    p1, p2 = s1 / n1, s2 / n2
    l1, u1 = wilson(s1, n1, z)
    l2, u2 = wilson(s2, n2, z)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def interpolated_proportion_difference(a: int, low: int, high: int, weight: float, n: int,
                                       z: float = Z95) -> tuple[float, tuple[float, float]]:
    """p_a - ((1 - weight) p_low + weight p_high), all of n trials, with a normal interval whose variance
    treats the three proportions as independent. Rows made with the same seeds are positively correlated,
    so the true variance is smaller: conservative, like Newcombe's interval for two rows."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight={weight}; allowed: 0 <= weight <= 1 (interpolation, not extrapolation)")
    pa, pl, ph = a / n, low / n, high / n
    estimate = pa - ((1 - weight) * pl + weight * ph)
    se = math.sqrt((pa * (1 - pa) + (1 - weight) ** 2 * pl * (1 - pl) + weight ** 2 * ph * (1 - ph)) / n)
    return estimate, (estimate - z * se, estimate + z * se)


def bootstrap_counts(n: int, replicates: int) -> Tensor:
    """(replicates, n) multiplicities; replicate b is the same for every row with this n."""
    rows = [np.bincount(np.random.default_rng([n, b]).integers(0, n, n), minlength=n) for b in range(replicates)]
    return torch.from_numpy(np.stack(rows)).double()


def normal_interval(estimate: float, replicates, z: float = Z95) -> tuple[float, float]:
    """estimate +- z bootstrap standard errors (the replicates' standard deviation)."""
    se = float(np.std(np.asarray(replicates, dtype=np.float64), ddof=1))
    return estimate - z * se, estimate + z * se


def binomial_draws(successes: int, n: int, draws: int, seed: str) -> np.ndarray:
    """Parametric bootstrap of a proportion: `draws` binomial(n, successes / n) / n, seeded by `seed` (a row's
    key) so a report regenerates the same numbers. Rows store their accuracy as one count, not per image, so
    this is the accuracy replicate the joint bootstrap of `effects_report.matched_accuracy_verdict` uses."""
    rng = np.random.default_rng([n, *seed.encode()])
    return rng.binomial(n, successes / n, draws) / n


def read_line(x: np.ndarray, y: np.ndarray, at: float) -> float:
    """y at `at` on the polyline through (x, y) sorted by x, straight on past its ends; where two points share
    an x, their mean y (the line is vertical there: any reading of it is as good)."""
    i = min(max(int(np.searchsorted(x, at)), 1), len(x) - 1)
    dx = x[i] - x[i - 1]
    w = 0.5 if dx == 0 else (at - x[i - 1]) / dx
    return float(y[i - 1] + w * (y[i] - y[i - 1]))


def centred_percentile_interval(estimate: float, replicates) -> tuple[float, float]:
    """estimate + (the replicates' 2.5th and 97.5th percentiles - their median). For a skewed statistic (a
    reading off a line whose slope is a ratio of uncertain differences); centred on the estimate because FID
    replicates sit above the FID of all images (see the module docstring) and the offset need not cancel."""
    r = np.asarray(replicates, dtype=np.float64)
    low, median, high = np.percentile(r, [2.5, 50.0, 97.5])
    return estimate + low - median, estimate + high - median


def verdict(interval: tuple[float, float], sign: int, identical: bool = False) -> str:
    """The claim "the difference has this sign" (+1 or -1) at 95%, from the difference's interval; "identical"
    when both sides are the same images (no difference to measure, not an undecided one)."""
    if identical:
        return "identical images"
    low, high = interval
    if (sign > 0 and low > 0) or (sign < 0 and high < 0):
        return "confirmed"
    if (sign > 0 and high < 0) or (sign < 0 and low > 0):
        return "refuted"
    return "undecided"


def weighted_fid(features: Tensor, ref_mu: Tensor, ref_sigma: Tensor, counts: Tensor) -> Tensor:
    """FID of the multiset (features, counts) for every row of counts (R, N) -> (R,), float64.

    counts of all ones gives the ordinary FID of the features (checked against `frechet_distance`).
    """
    x = features.double()
    ref_mu, ref_sigma = ref_mu.double().to(x.device), ref_sigma.double().to(x.device)
    counts = counts.double().to(x.device)
    d = x.shape[1]
    small = (counts > 0).sum(1).max() <= d  # every replicate keeps at most d distinct images
    gram = x @ ref_sigma @ x.T if small else None  # computed once: X S_ref X^T
    # S_ref = F F^T; Z = X F once, so a replicate's F^T S_c F is one N x d x d product (no d x d x d ones)
    z = None if small else x @ psd_factor(ref_sigma)
    sq_norms = x.square().sum(1)
    base = ref_sigma.trace() + ref_mu.square().sum()
    out = []
    for c in counts:
        keep = c > 0
        ck, xk = c[keep], x[keep]
        n = ck.sum()
        mu = ck @ xk / n
        if small:  # N x N form
            gk = gram[keep][:, keep]
            v = gk @ ck / n  # rows of X S_ref mu
            s = ck @ v / n  # mu^T S_ref mu
            root_c = ck.sqrt()
            m = (gk - v[:, None] - v[None, :] + s) * root_c[:, None] * root_c[None, :] / (n - 1)
        else:  # d x d form: F^T S_c F = (Z_k - mu F)^T diag(c) (Z_k - mu F) / (n - 1)
            zk = z[keep]
            centred = zk - ck @ zk / n
            m = (centred * ck[:, None]).T @ centred / (n - 1)
        trace_sqrt = torch.linalg.eigvalsh(m).clamp_min(0).sqrt().sum()
        trace_s2 = (ck @ sq_norms[keep] - n * mu.square().sum()) / (n - 1)
        out.append(base - 2 * ref_mu @ mu + mu.square().sum() + trace_s2 - 2 * trace_sqrt)
    return torch.stack(out).cpu()


def weighted_mean(values: Tensor, counts: Tensor) -> Tensor:
    """Mean of values (N,) under every row of counts (R, N) -> (R,)."""
    return counts.double() @ values.double() / counts.sum(1).double()
