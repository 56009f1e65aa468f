"""MAMBO-G, magnitude-aware guidance (arXiv 2508.03442): the scale shrinks where the guidance update is large
relative to the unconditional prediction, which early steps of large-scale CFG overshoot.

Per sample, with r = ||c - u|| / ||u|| (norms over all non-batch dimensions):

    w_t = 1 + (w - 1) exp(-alpha r),        guided = u + w_t (c - u).

As diffusers' `MagnitudeAwareGuidance` computes it (`use_original_formulation`: c + w exp(-alpha r) (c - u)),
in the model's output space and dtype. Its norms are `torch.linalg.vector_norm` over all non-batch dimensions:
diffusers 0.42.1 calls `torch.norm` with that dimension list, which equals this on packed (B, tokens, C)
latents but raises on (B, C, H, W) ones ("dim must be a 2-tuple"), so there the guider cannot run at all.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .base import COND, UNCOND, Scale, StepContext, TwoBranchRule, check_range, check_scale


class MAMBOG(TwoBranchRule):
    """Magnitude-aware CFG: w_t = 1 + (w - 1) exp(-alpha ||c - u|| / ||u||) per sample (see the module).

    scale: w (None: the call's guidance_scale; a number, per-step list, callable or Schedule).
    alpha: how fast the scale falls with the relative update size, >= 0 (diffusers' default 8; 0 is CFG).
    At w = 1 (0 with the original formulation) no unconditional pass is made, as diffusers' guider does.
    """

    config_fields = ("scale", "alpha", "use_original_formulation")

    def __init__(self, scale: Scale = None, alpha: float = 8.0, use_original_formulation: bool = False):
        self.scale = check_scale("MAMBOG", "scale", scale)
        self.alpha = check_range("MAMBOG", "alpha", alpha, 0.0)
        self.use_original_formulation = bool(use_original_formulation)

    def guide(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cond, uncond = preds[COND], preds[UNCOND]
        w = self.current_scale(ctx)
        if self.is_off(w):
            return cond
        dims = list(range(1, cond.ndim))
        diff = cond - uncond
        norm = torch.linalg.vector_norm
        ratio = norm(diff, dim=dims, keepdim=True) / norm(uncond, dim=dims, keepdim=True)
        damping = torch.exp(-self.alpha * ratio)
        if self.use_original_formulation:
            return cond + w * damping * diff
        return uncond + (1.0 + (w - 1.0) * damping) * diff
