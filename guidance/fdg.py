"""Frequency-decoupled guidance, FDG (Sadat, Vontobel, Salehi, Weber; arXiv 2506.19713).

CFG at one scale trades detail against saturation because the low frequencies (global structure, colour) and the
high ones (texture) need different strengths. FDG splits both predictions into a Laplacian pyramid and guides
each level with its own scale, optionally down-weighting the part of the update parallel to the conditional
level (as APG does), then rebuilds the prediction:

    c_l, u_l = pyramid levels,   d_l = c_l - u_l   (d_l <- w_par,l par(d_l; c_l) + orth(d_l; c_l)),
    g_l = u_l + w_l d_l,         guided = rebuild(g_0, ..., g_L).

As diffusers' `FrequencyDecoupledGuidance` computes it: kornia's `build_laplacian_pyramid` and `pyrup` (the field's
library for image pyramids), level 0 the finest, on the model's output. A level at scale 1 keeps its own conditional
level (diffusers 0.42.1 appends the previous level's there, and its rebuild then fails on mismatched sizes). The
pyramid needs (B, C, H, W) latents; packed token latents (Flux, Qwen-Image, LTX) and 5-D video latents are refused
by name. ComfyUI's FreSca is the related rule: it scales the low and high frequencies of the *update* c - u with a
Fourier-domain mask instead of guiding each pyramid level of both predictions.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .apg import project
from .base import COND, UNCOND, StepContext, TwoBranchRule, check_range


def _per_level(name: str, values, levels: int | None) -> list[float]:
    values = [values] if not isinstance(values, (list, tuple)) else list(values)
    if not values or (levels is not None and len(values) not in (1, levels)):
        raise ValueError(f"FDG: {name}={values!r}; allowed: one number per pyramid level"
                         + ("" if levels is None else f" ({levels}), or one for all"))
    out = [check_range("FDG", f"{name}[{i}]", v) for i, v in enumerate(values)]
    return out * levels if levels is not None and len(out) == 1 else out


class FDG(TwoBranchRule):
    """Frequency-decoupled guidance (see the module).

    scales: one CFG scale per pyramid level, finest first (diffusers' default [10, 5]: two levels). Not the call's
    guidance_scale. parallel_weights: one weight per level (or one for all) of the update's part parallel to the
    conditional level; None or 1 is plain CFG per level. use_original_formulation: c_l + w_l d_l (diffusers' option).
    """

    config_fields = ("scales", "parallel_weights", "use_original_formulation")

    def __init__(self, scales: Sequence[float] = (10.0, 5.0), parallel_weights: float | Sequence[float] | None = None,
                 use_original_formulation: bool = False):
        self.scales = _per_level("scales", scales, None)
        if len(self.scales) < 2:
            raise ValueError(f"FDG: scales={self.scales!r} has one level, which is CFG; allowed: two or more levels")
        levels = len(self.scales)
        self.parallel_weights = None if parallel_weights is None else _per_level("parallel_weights",
                                                                                 parallel_weights, levels)
        self.use_original_formulation = bool(use_original_formulation)

    def branches(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        off = all(self.is_off(w) for w in self.scales)
        return {COND: ctx.all(), UNCOND: ctx.none() if off else ctx.all()}

    def guide(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cond, uncond = preds[COND], preds[UNCOND]
        if all(self.is_off(w) for w in self.scales):
            return cond
        if cond.ndim != 4:
            raise ValueError(f"FDG: the Laplacian pyramid needs (B, C, H, W) latents; this pipeline's are "
                             f"{tuple(cond.shape)} (packed tokens or video); allowed: an image pipeline with "
                             "spatial latents (SD, SDXL, SD3, PixArt, DiT, the embedded model)")
        from kornia.geometry import pyrup
        from kornia.geometry.transform import build_laplacian_pyramid

        levels = len(self.scales)
        cond_pyramid = build_laplacian_pyramid(cond, levels)
        uncond_pyramid = build_laplacian_pyramid(uncond, levels)
        weights = self.parallel_weights or [1.0] * levels
        guided = []
        for w, w_par, c, u in zip(self.scales, weights, cond_pyramid, uncond_pyramid):
            if self.is_off(w):
                guided.append(c)
                continue
            shift = c - u
            if not math.isclose(w_par, 1.0):
                parallel, orthogonal = project(shift, c)
                shift = w_par * parallel + orthogonal
            guided.append((c if self.use_original_formulation else u) + w * shift)
        image = guided[-1]  # rebuild from the coarsest level up
        for level in reversed(guided[:-1]):
            image = pyrup(image) + level
        return image
