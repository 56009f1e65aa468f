"""Adaptive Projected Guidance (Sadat, Hilliges, Weber; arXiv 2410.02416, ICLR 2025).

Paper rule, on denoised predictions D_c, D_u (Algorithm 1):

    dD_t   = D_c - D_u
    A_t    = dD_t + beta * A_{t-1}                     reverse momentum (beta < 0), A_{-1} = 0
    dD_t  <- A_t * min(1, r / ||A_t||)                 norm threshold r (0 = off), per sample
    par    = (<dD_t, D_c> / <D_c, D_c>) D_c             projection on D_c, per sample, float64
    D_APG  = D_c + (w - 1) * ((dD_t - par) + eta * par)

With eta = 1, r = 0, beta = 0 it is exactly CFG. Norms and projections reduce over all non-batch
dims (the paper's dims=[-1,-2,-3] would mix samples in packed (B, seq, C) latents).

`mode="diffusers"` reproduces diffusers' `AdaptiveProjectedGuidance` instead: the same steps on
the raw model output, combined as `uncond + w * update` (or `cond + w * update` with
`use_original_formulation=True`). The paper and its author apply APG to x0; in noise space it is
barely different from CFG (paper Fig. 12), so "paper" is the default.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .base import COND, UNCOND, GuidanceStrategy, Scale, StepContext, check_range, check_scale, resolve_scale

MODES = ("paper", "diffusers")

# Settings the paper reports per model ("Table 10"), as collected in methods.md section 1.3.
# Evidence: secondary sources only, NOT verified against the PDF; r is in that model's latent units.
PRESETS_UNVERIFIED = {
    "sdxl": {"scale": 15.0, "eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5},
    "sd21": {"scale": 10.0, "eta": 0.0, "norm_threshold": 7.5, "momentum": -0.75},
    "dit-xl-2": {"scale": 4.0, "eta": 0.0, "norm_threshold": 5.0, "momentum": -0.5},
    "edm2-s": {"scale": 4.0, "eta": 0.0, "norm_threshold": 2.5, "momentum": -0.75},
}


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.ndim - 1))


def project(diff: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(parallel, orthogonal) parts of `diff` relative to `onto`, per sample, computed in float64.

    parallel = (<d, c> / <c, c>) c: two dot products instead of normalising c first (as diffusers does), the
    same value to float64 rounding in half the tensor operations (this runs at every step of every sample)."""
    d, c = diff.flatten(1).double(), onto.flatten(1).double()
    # <c, c> floored as F.normalize floors ||c|| at 1e-12: c = 0 has no parallel part.
    coef = torch.linalg.vecdot(d, c) / torch.linalg.vecdot(c, c).clamp_min(1e-24)
    parallel = coef.unsqueeze(1) * c
    return parallel.view_as(diff).to(diff.dtype), (d - parallel).view_as(diff).to(diff.dtype)


class APG(GuidanceStrategy):
    """Adaptive projected guidance.

    eta: weight of the parallel component, >= 0 (paper recommends 0).
    norm_threshold: r, clip ||dD|| per sample to r; 0 turns it off. Scale-dependent: tune per model.
    momentum: beta in [-1, 1]; negative is the paper's "reverse momentum"; 0 turns it off.
    Defaults are the paper's best EDM2-S ablation values (r = 2.5, beta = -0.75, eta = 0; from
    secondary sources, see PRESETS_UNVERIFIED); `APG.preset(name)` gives the per-model rows.
    """

    config_fields = ("scale", "eta", "norm_threshold", "momentum", "mode", "use_original_formulation")

    def __init__(self, scale: Scale = None, eta: float = 0.0, norm_threshold: float = 2.5, momentum: float = -0.75,
                 mode: str = "paper", use_original_formulation: bool = False):
        self.scale = check_scale("APG", "scale", scale)
        self.eta = check_range("APG", "eta", eta, 0.0)
        self.norm_threshold = check_range("APG", "norm_threshold", norm_threshold, 0.0)
        self.momentum = check_range("APG", "momentum", momentum, -1.0, 1.0)
        if mode not in MODES:
            raise ValueError(f"APG: mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
        if use_original_formulation and mode != "diffusers":
            raise ValueError("APG: use_original_formulation=True is only meaningful with mode='diffusers'")
        self.mode = mode
        self.use_original_formulation = bool(use_original_formulation)
        self.space = "x0" if mode == "paper" else "model"
        self._average: torch.Tensor | None = None  # momentum buffer A_t of the last scheduler step, per sample
        self._before: torch.Tensor | None = None  # A_{t-1}: the buffer before the current scheduler step

    @classmethod
    def preset(cls, name: str, **overrides) -> "APG":
        if name not in PRESETS_UNVERIFIED:
            raise ValueError(f"APG.preset: name={name!r} is unknown; allowed: {', '.join(PRESETS_UNVERIFIED)}")
        return cls(**{**PRESETS_UNVERIFIED[name], **overrides})

    @classmethod
    def from_comfyui(cls, cfg: float, eta: float = 1.0, norm_threshold: float = 5.0, momentum: float = 0.0) -> "APG":
        """The APG that ComfyUI's "Adaptive Projected Guidance" node runs at the sampler's `cfg` (its defaults
        included: eta 1, r 5, momentum 0).

        The node (comfy_extras/nodes_apg.py, `APG.patch`) applies the paper's steps to the denoised predictions but
        returns D_c + cfg * update, where the paper has D_c + (w - 1) * update: its cfg counts one lower, so it is
        the paper rule at w = cfg + 1. The node's projection reduces over the last three dimensions, which is every
        non-batch dimension of (B, C, H, W) latents (on 5-D video latents the node projects per frame, this per
        sample); it resets its momentum when sigma rises (a new generation), as our reset() per call does.
        """
        scale = check_range("APG.from_comfyui", "cfg", cfg)
        return cls(scale=scale + 1.0, eta=eta, norm_threshold=norm_threshold, momentum=momentum)

    def reset(self) -> None:
        self._average = None
        self._before = None

    def advance_momentum(self, diff: torch.Tensor, starts_step: bool = True) -> torch.Tensor:
        """A_t = dD_t + beta A_{t-1}: the reverse-momentum average of the update, advanced once per scheduler step
        (`starts_step`); returns dD_t itself when momentum is off."""
        if self.momentum == 0.0:
            return diff
        if self._average is not None and self._average.shape != diff.shape:
            raise RuntimeError(
                f"APG: batch shape changed from {tuple(self._average.shape)} to {tuple(diff.shape)} within "
                "one generation; momentum is kept per sample, call reset() between generations"
            )
        if starts_step:
            self._before = self._average
        diff = diff if self._before is None else diff + self.momentum * self._before  # diffusers' order of operations
        if starts_step:
            self._average = diff
        return diff

    def update_direction(self, cond: torch.Tensor, uncond: torch.Tensor, starts_step: bool = True) -> torch.Tensor:
        """Momentum, norm threshold and projection: the (dD_perp + eta * dD_par) of the paper.

        The momentum buffer advances once per scheduler step (`starts_step`); the further evaluations
        of a multi-evaluation solver's step (Heun's corrector) use the buffer of the step before, as
        the predictor did, and leave it unchanged."""
        diff = self.advance_momentum(cond - uncond, starts_step)
        if self.norm_threshold > 0:
            # Clip in at least float32: fp16 norms of whole latents overflow.
            d32 = diff.float()
            diff = (d32 * torch.clamp(self.norm_threshold / _per_sample_norm(d32), max=1.0)).to(diff.dtype)
        parallel, orthogonal = project(diff, cond)
        return orthogonal if self.eta == 0.0 else orthogonal + self.eta * parallel

    def guide(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        w = resolve_scale("APG", "scale", self.scale, ctx)
        cond, uncond = preds[COND], preds[UNCOND]
        update = self.update_direction(cond, uncond, ctx.starts_step)
        if self.mode == "paper":
            return cond + (w - 1.0) * update
        return (cond if self.use_original_formulation else uncond) + w * update
