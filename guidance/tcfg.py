"""Tangential classifier-free guidance, TCFG (Kwon, Ha, Kim et al. 2025, arXiv 2503.18137).

The paper observes that the unconditional prediction carries a component, tangential to the data manifold,
that pulls samples off it. Per sample it stacks the two predictions as the rows of a 2 x D matrix, takes its
singular value decomposition, and keeps only the unconditional prediction's part along the first (dominant)
right singular vector v1:

    u' = <u, v1> v1,        guided = u' + w (c - u').

As diffusers' `TangentialClassifierFreeGuidance` and ComfyUI's TCFG node compute it: the SVD in float32 of the
predictions in the model's output space (the sign of v1 cancels in u').
"""

from __future__ import annotations

from typing import Mapping

import torch

from .base import COND, UNCOND, Scale, StepContext, TwoBranchRule, check_scale


def dominant_projection(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """`uncond` projected on the first right singular vector of [cond; uncond] (per sample), cast back."""
    stacked = torch.stack([cond.flatten(1), uncond.flatten(1)], dim=1).float()  # (B, 2, D)
    vh = torch.linalg.svd(stacked, full_matrices=False).Vh  # (B, 2, D): right singular vectors as rows
    coords = uncond.flatten(1).float().unsqueeze(1) @ vh.mT  # (B, 1, 2): u in that basis
    coords[..., 1] = 0.0  # drop the second (tangential) coordinate
    return (coords @ vh).reshape(uncond.shape).to(uncond.dtype)


class TCFG(TwoBranchRule):
    """guided = u' + w (c - u') with u' the unconditional prediction's dominant-direction part (see the module).

    scale: w (None: the call's guidance_scale; a number, per-step list, callable or Schedule).
    use_original_formulation: c + w (c - u') (diffusers' option). At w = 1 (0 with the original formulation) the
    conditional prediction is returned without an unconditional pass, as diffusers' guider does.
    """

    config_fields = ("scale", "use_original_formulation")

    def __init__(self, scale: Scale = None, use_original_formulation: bool = False):
        self.scale = check_scale("TCFG", "scale", scale)
        self.use_original_formulation = bool(use_original_formulation)

    def guide(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cond, w = preds[COND], self.current_scale(ctx)
        if self.is_off(w):
            return cond
        uncond = dominant_projection(cond, preds[UNCOND])
        return (cond if self.use_original_formulation else uncond) + w * (cond - uncond)
