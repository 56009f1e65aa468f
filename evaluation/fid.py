"""Frechet distance in float64: streaming moments, an exact symmetric trace term, reference statistics.

The trace term tr sqrt(S1 S2) is computed as sum sqrt(eigvalsh(F^T S2 F)) for any factor F with S1 = F F^T:
F^T S2 F is similar to S1 S2 and symmetric PSD, so a symmetric eigensolver is exact and several times cheaper
than scipy's sqrtm or the general eigvals(S1 @ S2) used by torchmetrics / torch-fidelity. F is S1's Cholesky
factor (one cheap factorisation, so even the first call is fast), or its symmetric square root when S1 is
singular (fewer samples than dimensions), where Cholesky fails. F depends on the reference only and is cached.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from tqdm import tqdm  # plain text bars: tqdm.auto wants ipywidgets in notebooks

from guidance.atomic import atomic_save, atomic_write
from .images import batches_from, load_image_source


# Eigenvalues below -PSD_TOLERANCE * the largest are not rounding: the matrix is not a covariance.
PSD_TOLERANCE = 1e-6


def sqrtm_psd(sigma: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix via eigh in float64 (rounding-negative eigenvalues -> 0).

    Raises ValueError for a matrix that is not finite, or not positive semi-definite beyond rounding (such a
    "covariance" gave FIDs such as -1737 instead of an error)."""
    sigma = sigma.double()
    if not bool(torch.isfinite(sigma).all()):
        raise ValueError("covariance holds NaN or inf; allowed: a finite, symmetric positive semi-definite matrix")
    w, v = torch.linalg.eigh(sigma)
    largest = w.abs().amax(-1, keepdim=True)
    if bool((w < -PSD_TOLERANCE * largest).any()):
        raise ValueError(f"covariance is not positive semi-definite: smallest eigenvalue {float(w.min()):.4g} "
                         f"against the largest {float(largest.max()):.4g}; allowed: a covariance matrix (recompute "
                         "the statistics with `guidance-eval stats`)")
    return (v * w.clamp_min(0).sqrt().unsqueeze(-2)) @ v.mT


def psd_factor(sigma: Tensor) -> Tensor:
    """A factor F with sigma = F F^T, in float64: the Cholesky factor (about 25x cheaper than an
    eigendecomposition at d = 2048), or the symmetric square root when sigma is singular."""
    sigma = sigma.double()
    factor, info = torch.linalg.cholesky_ex(sigma)
    return factor if int(info.max()) == 0 else sqrtm_psd(sigma)


def lower_sandwich(lower: Tensor, sigma: Tensor, block: int = 256) -> Tensor:
    """L^T sigma L for a lower-triangular L, its blocks on and below the diagonal only (all that eigvalsh reads:
    the lower triangle; the blocks above are left zero), by blocks that skip L's zeros: about 60% of the two full
    products' work. Written here because torch has neither BLAS's triangular product (trmm) nor its triangle-only
    product (gemmt); at d = 2048 this saves 0.3 s of the ~1.5 s a first Frechet distance takes on one CPU thread."""
    n = lower.shape[-1]
    right = torch.empty(sigma.shape[:-2] + (n, n), dtype=sigma.dtype, device=sigma.device)
    for j in range(0, n, block):  # (sigma L)[:, J] = sigma[:, j:] L[j:, J]: rows of L above j are zero
        right[..., :, j:j + block] = sigma[..., :, j:] @ lower[j:, j:j + block]
    out = torch.zeros_like(right)
    for i in range(0, n, block):  # (L^T (sigma L))[I, :i_end]: the blocks on and left of the diagonal
        end = min(i + block, n)
        out[..., i:end, :end] = lower[i:, i:end].mT @ right[..., i:, :end]
    return out


def trace_sqrt_product(factor1: Tensor, sigma2: Tensor) -> Tensor:
    """tr sqrt(S1 S2) from a factor of S1 (S1 = F F^T: `psd_factor` or `sqrtm_psd`); ``sigma2`` may be a stack
    (..., d, d), e.g. one per guidance scale."""
    sigma2 = sigma2.double()
    triangular = bool(torch.equal(factor1, factor1.tril()))
    m = lower_sandwich(factor1, sigma2) if triangular else factor1.mT @ sigma2 @ factor1
    # eigvalsh reads only the lower triangle, so the product's rounding asymmetry needs no clean-up pass.
    return torch.linalg.eigvalsh(m).clamp_min(0).sqrt().sum(-1)


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor,
                     factor1: Tensor | None = None) -> Tensor:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), in float64; pass ``factor1`` (S1 = F F^T, e.g.
    ``psd_factor(S1)``) to reuse it."""
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    root = psd_factor(sigma1) if factor1 is None else factor1.double()
    trace = sigma1.diagonal(dim1=-2, dim2=-1).sum(-1) + sigma2.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (mu1 - mu2).square().sum(-1) + trace - 2 * trace_sqrt_product(root, sigma2)


class FeatureMoments(Metric):
    """Streaming float64 sum and sum of outer products of features, on the features' device.

    A torchmetrics Metric so that reset, device moves and distributed sums come for free.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, feature_dim: int = 2048, **kwargs):
        super().__init__(**kwargs)
        self.feature_dim = feature_dim
        self.add_state("feature_sum", torch.zeros(feature_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("outer_sum", torch.zeros(feature_dim, feature_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, features: Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"expected features (N, {self.feature_dim}), got {tuple(features.shape)}")
        f = features.to(self.feature_sum.device, torch.float64)
        self.feature_sum += f.sum(0)
        self.outer_sum += f.T @ f
        self.num_samples += f.shape[0]

    def moments(self) -> tuple[Tensor, Tensor]:
        """(mean, unbiased covariance), float64."""
        n = int(self.num_samples)
        if n < 2:
            raise RuntimeError(f"at least 2 samples are needed for a covariance, got {n}")
        mu = self.feature_sum / n
        sigma = torch.addr(self.outer_sum, mu, mu, alpha=-n).div_(n - 1)  # one pass over the d x d sums
        # X^T X from a blocked matmul is symmetric only up to rounding; make it exactly so (saved as a triangle).
        return mu, (sigma + sigma.T) / 2

    def compute(self) -> tuple[Tensor, Tensor]:
        return self.moments()


@dataclass(eq=False)
class ReferenceStats:
    """Reference mean/covariance (float64) with the preset and extractor that produced them.

    ``features`` (float32, optional) are kept for KID and precision/recall, which cannot work from moments.
    """

    mu: Tensor
    sigma: Tensor
    n: int
    preset: str
    extractor_id: str
    features: Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False, init=False)

    @property
    def feature_dim(self) -> int:
        return self.mu.shape[0]

    @classmethod
    def from_features(cls, features: Tensor, preset: str, extractor_id: str,
                      keep_features: bool = False) -> "ReferenceStats":
        moments = FeatureMoments(features.shape[1]).to(features.device)
        moments.update(features)
        mu, sigma = moments.moments()
        kept = features.detach().float().cpu() if keep_features else None
        return cls(mu.cpu(), sigma.cpu(), features.shape[0], preset, extractor_id, kept)

    def on(self, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """(mu, sigma) on ``device``, cached."""
        key = ("moments", str(device))
        if key not in self._cache:
            self._cache[key] = (self.mu.to(device), self.sigma.to(device))
        return self._cache[key]

    def sigma_factor(self, device: torch.device | str) -> Tensor:
        """A factor F of sigma (sigma = F F^T, `psd_factor`) on ``device``, computed once per reference and device."""
        key = ("factor", str(device))
        if key not in self._cache:
            self._cache[key] = psd_factor(self.on(device)[1])
        return self._cache[key]

    def save(self, path: str | os.PathLike) -> None:
        # Sigma is symmetric: its upper triangle alone halves the file (float64 barely compresses).
        rows, cols = np.triu_indices(self.feature_dim)
        arrays = dict(mu=self.mu.double().numpy(), sigma_triu=self.sigma.double().numpy()[rows, cols],
                      n=np.int64(self.n),
                      feature_dim=np.int64(self.feature_dim), preset=np.str_(self.preset),
                      extractor_id=np.str_(self.extractor_id))
        if self.features is not None:
            arrays["features"] = self.features.float().numpy()
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike, feature_dim: int | None = None) -> "ReferenceStats":
        """Load a stats file; ``feature_dim`` guards against mixing feature spaces."""
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError):  # (numpy's own message suggests allow_pickle=True: never for data)
            raise ValueError(f"{path} is not a statistics .npz file (not a zip archive)") from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"{path} is a bare .npy array, not a statistics .npz file")
        with data:
            missing = [k for k in ("mu", "n", "feature_dim", "preset", "extractor_id") if k not in data.files]
            if missing or not {"sigma", "sigma_triu"} & set(data.files):
                raise ValueError(f"{path} is not a statistics file: it lacks {missing or ['sigma']} "
                                 f"(holds {sorted(data.files)})")
            dim = int(data["feature_dim"])
            if feature_dim is not None and dim != feature_dim:
                raise ValueError(f"{path} holds {dim}-d statistics, but the extractor gives {feature_dim}-d features")
            sigma = _symmetric_from_triu(data["sigma_triu"], dim) if "sigma_triu" in data.files else data["sigma"]
            if data["mu"].shape != (dim,) or sigma.shape != (dim, dim):
                raise ValueError(f"{path} is inconsistent: feature_dim={dim} but mu has shape {data['mu'].shape} "
                                 f"and sigma {sigma.shape}; recompute it with `guidance-eval stats`")
            for name, value in (("mu", data["mu"]), ("sigma", sigma)):
                if not np.isfinite(value).all():
                    raise ValueError(f"{path}: {name} holds NaN or inf; these are not statistics of features; "
                                     "recompute them with `guidance-eval stats`")
            if not np.any(sigma):
                raise ValueError(f"{path}: sigma is all zeros (features that never vary), so no Frechet distance "
                                 "against it means anything; recompute the statistics with `guidance-eval stats`")
            features = torch.from_numpy(data["features"]) if "features" in data.files else None
            return cls(torch.from_numpy(data["mu"]).double(), torch.from_numpy(sigma).double(),
                       int(data["n"]), str(data["preset"]), str(data["extractor_id"]), features)


def _symmetric_from_triu(values: np.ndarray, dim: int) -> np.ndarray:
    if values.shape != (dim * (dim + 1) // 2,):
        raise ValueError(f"sigma_triu has {values.shape} entries; a {dim}-d covariance needs {dim * (dim + 1) // 2}")
    sigma = np.zeros((dim, dim), dtype=np.float64)
    rows, cols = np.triu_indices(dim)
    sigma[rows, cols] = values
    sigma[cols, rows] = values
    return sigma


def compute_reference_stats(source, extractor, batch_size: int = 50, limit: int | None = None,
                            keep_features: bool = False, progress: bool = True,
                            shuffle_seed: int | None = None, checkpoint: str | os.PathLike | None = None,
                            checkpoint_every: int = 20) -> ReferenceStats:
    """Stream images (folder of PNG/JPG, .npz with ``images`` uint8 NHWC, or an array) through ``extractor``.

    ``extractor`` maps uint8 (B, 3, H, W) to features and carries ``preset``, ``extractor_id``, ``feature_dim``
    (e.g. ``InceptionFeatures``). ``limit`` takes the first images: shuffle class-ordered data beforehand.
    ``checkpoint``: a file where the running moments are saved every ``checkpoint_every`` batches; an
    interrupted computation rerun with the same arguments resumes there (50k images take hours on a CPU).
    """
    items, total = load_image_source(source, limit, shuffle_seed)  # an .npz is read once
    device = next(extractor.parameters()).device
    moments = FeatureMoments(extractor.feature_dim).to(device)
    kept: list[Tensor] = []
    done = 0
    saved = None
    if checkpoint is not None and os.path.isfile(checkpoint):
        try:
            saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated or zero bytes (a kill or a full disk): start over
            warnings.warn(f"checkpoint={str(checkpoint)!r} is corrupt or truncated ({type(e).__name__}); "
                          "recomputing from the first image")
    identity = _stats_identity(source, extractor, limit, shuffle_seed, keep_features, total, batch_size)
    if saved is not None:
        if int(saved["total"]) != total or int(saved["batch_size"]) != batch_size:
            raise ValueError(f"checkpoint={str(checkpoint)!r} belongs to another computation "
                             f"({int(saved['total'])} images, batch {int(saved['batch_size'])}); delete it")
        made_by = saved.get("identity")  # absent in checkpoints of earlier versions: total and batch checked above
        if isinstance(made_by, dict):
            diff = [f"{k} (checkpoint: {made_by.get(k)!r}, now: {identity.get(k)!r})"
                    for k in sorted(set(made_by) | set(identity)) if made_by.get(k) != identity.get(k)]
            if diff:
                raise ValueError(f"checkpoint={str(checkpoint)!r} belongs to another computation (differing: "
                                 f"{'; '.join(diff)}); resuming would mix the two: delete it, or rerun with its "
                                 "settings")
        for name in ("feature_sum", "outer_sum", "num_samples"):
            setattr(moments, name, saved[name].to(device))
        kept = [saved["features"]] if keep_features and saved["features"].numel() else []
        done = int(saved["done"])
    with tqdm(total=total, initial=done * batch_size, unit="img", desc="reference features",
              disable=not progress) as bar:
        for i, batch in enumerate(batches_from(items, batch_size)):
            if i < done:
                continue
            features = extractor(batch)
            moments.update(features)
            if keep_features:
                kept.append(features.float().cpu())
            bar.update(len(batch))
            if checkpoint is not None and (i + 1) % checkpoint_every == 0:
                _save_progress(checkpoint, moments, kept, i + 1, total, batch_size, identity)
    mu, sigma = moments.moments()
    return ReferenceStats(mu.cpu(), sigma.cpu(), int(moments.num_samples), extractor.preset, extractor.extractor_id,
                          torch.cat(kept) if keep_features else None)


def _stats_identity(source, extractor, limit, shuffle_seed, keep_features, total, batch_size) -> dict:
    """Everything that decides a reference computation's features: the source (a file by path, size and time; a
    folder by path; an array by shape and a hash of its bytes), the preset and network, limit, shuffle, batch."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).resolve()
        stat = path.stat() if path.is_file() else None
        what = str(path) + ("" if stat is None else f" ({stat.st_size} bytes, mtime {stat.st_mtime_ns})")
    elif isinstance(source, (np.ndarray, Tensor)):
        array = np.ascontiguousarray(source.cpu().numpy() if isinstance(source, Tensor) else source)
        what = f"array {array.shape} {array.dtype} sha256 {hashlib.sha256(array.tobytes()).hexdigest()[:16]}"
    else:
        what = f"{type(source).__name__} of {total} items"
    return {"source": what, "preset": getattr(extractor, "preset", None),
            "extractor_id": getattr(extractor, "extractor_id", None), "limit": limit, "shuffle_seed": shuffle_seed,
            "keep_features": bool(keep_features), "total": total, "batch_size": batch_size}


def _save_progress(path, moments: FeatureMoments, kept: list[Tensor], done: int, total: int, batch_size: int,
                   identity: dict | None = None) -> None:
    state = {name: getattr(moments, name).cpu() for name in ("feature_sum", "outer_sum", "num_samples")}
    state.update(done=done, total=total, batch_size=batch_size, identity=identity,
                 features=torch.cat(kept) if kept else torch.empty(0))
    atomic_save(state, path)
