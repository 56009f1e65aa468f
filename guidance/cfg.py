"""Classifier-free guidance (Ho & Salimans 2022) with CFG-rescale (Lin et al. 2023, Sec. 3.4)."""

from __future__ import annotations

from typing import Mapping

import torch

from .base import COND, UNCOND, GuidanceStrategy, Scale, StepContext, check_range, check_scale, resolve_scale


def rescale_to_cond_std(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """CFG-rescale: pull the per-sample std of the guided prediction back towards the conditional one.

    Same arithmetic as diffusers' `rescale_noise_cfg` (std over all non-batch dims, in the model's
    output space), written here because guidance/ does not import diffusers.
    """
    dims = list(range(1, cond.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


class CFG(GuidanceStrategy):
    """guided = uncond + w * (cond - uncond), optionally rescaled with `guidance_rescale` = phi.

    scale: None (the call's guidance_scale), a number, a per-step list, or a callable of the
    StepContext (see guidance.schedules). guidance_rescale: None takes the call's own value
    (diffusers SD/SDXL pipelines have one), which the caller applies after any rule
    (`guidance.guided_prediction`); else phi in [0, 1], applied here and replacing the call's.
    For step or sigma intervals wrap it: `Interval(CFG(), start=0.2, stop=0.8)`.
    """

    config_fields = ("scale", "guidance_rescale")

    def __init__(self, scale: Scale = None, guidance_rescale: float | None = None):
        self.scale = check_scale("CFG", "scale", scale)
        self.guidance_rescale = (
            None if guidance_rescale is None else check_range("CFG", "guidance_rescale", guidance_rescale, 0, 1)
        )

    def guide(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        w = resolve_scale("CFG", "scale", self.scale, ctx)
        cond, uncond = preds[COND], preds[UNCOND]
        guided = uncond + w * (cond - uncond)  # the order of operations diffusers pipelines use
        phi = self.guidance_rescale or 0.0  # None: the call's, applied by guided_prediction
        return rescale_to_cond_std(guided, cond, phi) if phi > 0 else guided

    @property
    def sets_rescale(self) -> bool:
        return self.guidance_rescale is not None
