"""APG-Mix (HunyuanImage 2.1; diffusers' `AdaptiveProjectedMixGuidance`): classifier-free guidance for the first
steps, then adaptive projected guidance (`APG(mode="diffusers")`, in the model's output space) with its own
scale. APG's reverse-momentum average already runs during the CFG steps, so APG starts with the history of the
whole trajectory, as diffusers' guider does.

Steps are scheduler steps; APG takes over at step > `apg_start_step` (diffusers' convention).
"""

from __future__ import annotations

from typing import Mapping

import torch

from .apg import APG
from .base import COND, UNCOND, Scale, StepContext, TwoBranchRule, check_scale, resolve_scale


class APGMix(TwoBranchRule):
    """CFG at `scale` up to scheduler step `apg_start_step`, then APG (diffusers' rule) at `apg_scale`.

    scale: the CFG phase's w (None: the call's guidance_scale; a number, per-step list, callable or Schedule).
    apg_scale, momentum, norm_threshold, eta: APG's scale, beta, r and eta (diffusers' defaults 10, -0.5, 10, 0;
    apg_scale takes numbers, lists, callables or None = the call's scale, as `scale`).
    use_original_formulation: c + w (...) instead of u + w (...), in both phases (diffusers' option).
    At w = 1 (0 with the original formulation) nothing guides and no unconditional pass is made; at
    apg_scale = 1 (0) the CFG phase goes on, as in diffusers.
    """

    config_fields = ("scale", "apg_scale", "momentum", "norm_threshold", "eta", "apg_start_step",
                     "use_original_formulation")

    def __init__(self, scale: Scale = None, apg_scale: float = 10.0, momentum: float = -0.5,
                 norm_threshold: float = 10.0, eta: float = 0.0, apg_start_step: int = 5,
                 use_original_formulation: bool = False):
        self.scale = check_scale("APGMix", "scale", scale)
        # APG validates apg_scale, momentum, norm_threshold and eta, with their names in the message.
        self._apg = APG(scale=apg_scale, eta=eta, norm_threshold=norm_threshold, momentum=momentum,
                        mode="diffusers", use_original_formulation=bool(use_original_formulation))
        if isinstance(apg_start_step, bool) or not isinstance(apg_start_step, int) or apg_start_step < 0:
            raise ValueError(f"APGMix: apg_start_step={apg_start_step!r} is invalid; allowed: an integer >= 0")
        self.apg_scale, self.momentum = self._apg.scale, self._apg.momentum
        self.norm_threshold, self.eta = self._apg.norm_threshold, self._apg.eta
        self.apg_start_step = apg_start_step
        self.use_original_formulation = bool(use_original_formulation)

    def reset(self) -> None:
        self._apg.reset()

    def guide(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cond, uncond = preds[COND], preds[UNCOND]
        w = self.current_scale(ctx)
        if self.is_off(w):
            return cond
        apg_on = ctx.scheduler_step > self.apg_start_step
        if apg_on and not self.is_off(resolve_scale("APGMix", "apg_scale", self.apg_scale, ctx)):
            return self._apg.guide(ctx, preds)
        self._apg.advance_momentum(cond - uncond, ctx.starts_step)  # the average runs through the CFG phase
        return (cond if self.use_original_formulation else uncond) + w * (cond - uncond)
