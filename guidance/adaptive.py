"""Adaptive Guidance (Castillo et al., arXiv 2312.12487, AAAI 2025).

While guidance is on, measure per sample the cosine similarity of the conditional and
unconditional predictions,

    gamma_t = <eps_c, eps_u> / (||eps_c|| ||eps_u||)      (float32, all non-batch dims)

and once gamma_t >= gamma_bar switch that sample to the conditional prediction for the rest of the
sampling: its unconditional branch is no longer evaluated, which is the NFE saving. The switch is
sticky because gamma can no longer be computed once the null pass is dropped.

Open choice (methods.md 2.1, unverified in the paper): whether the step on which gamma first
crosses the threshold already uses the conditional prediction. Default `switch="next"`: that step
keeps its guided prediction (both passes were paid for), the next one is conditional-only, as one
secondary note and the reference ComfyUI node do. `switch="same"` uses eps_c at once.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .base import COND, UNCOND, GuidanceStrategy, StepContext, check_range
from .cfg import CFG

SPACES = ("eps", "x0", "model")
SWITCHES = ("next", "same")


def cosine_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)


class AdaptiveGuidance(GuidanceStrategy):
    """Guide with `inner` (default CFG) until cond and uncond agree, then run the conditional model only.

    threshold: gamma_bar; the paper studies 0.991-0.996 on 20-step LDMs. > 1 never switches (= inner).
    similarity_space: "eps" (the paper's noise predictions, default), "x0", or "model" (raw output).
    switch: "next" (default) or "same", see the module docstring.
    """

    config_fields = ("inner", "threshold", "similarity_space", "switch")

    def __init__(self, inner: GuidanceStrategy | None = None, threshold: float = 0.991,
                 similarity_space: str = "eps", switch: str = "next"):
        self.inner = CFG() if inner is None else inner
        if not isinstance(self.inner, GuidanceStrategy):
            raise ValueError(f"AdaptiveGuidance: inner={inner!r} is not a guidance strategy")
        self.threshold = check_range("AdaptiveGuidance", "threshold", threshold, -1.0)
        if similarity_space not in SPACES:
            raise ValueError(f"AdaptiveGuidance: similarity_space={similarity_space!r} is unknown; allowed: {', '.join(SPACES)}")
        if switch not in SWITCHES:
            raise ValueError(f"AdaptiveGuidance: switch={switch!r} is unknown; allowed: {', '.join(SWITCHES)}")
        self.similarity_space = similarity_space
        self.switch = switch
        self.switched: torch.Tensor | None = None  # (B,) bool, per sample, reset per call
        self.switch_step: torch.Tensor | None = None  # (B,) step at which each sample switched (-1: never)

    def reset(self) -> None:
        self.inner.reset()
        self.switched = None
        self.switch_step = None

    def _state(self, ctx: StepContext) -> torch.Tensor:
        if self.switched is None or self.switched.shape[0] != ctx.batch_size:
            self.switched = ctx.none()
            self.switch_step = torch.full((ctx.batch_size,), -1, dtype=torch.long, device=ctx.x.device)
        return self.switched

    def branches(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        switched = self._state(ctx)
        inner = self.inner.branches(ctx)
        return {**inner, COND: ctx.all(), UNCOND: inner.get(UNCOND, ctx.all()) & ~switched}

    def similarity(self, ctx: StepContext, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        if self.similarity_space == "eps":
            cond, uncond = ctx.param.to_eps(cond), ctx.param.to_eps(uncond)
        elif self.similarity_space == "x0":
            cond, uncond = ctx.to_x0(cond), ctx.to_x0(uncond)
        return cosine_per_sample(cond, uncond)

    def combine(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        switched = self._state(ctx)
        cond = preds[COND]
        active = ctx.evaluated.get(UNCOND, ~switched) if ctx.evaluated else ~switched
        if not bool(active.any()):
            return cond
        guided = self.inner.combine(ctx, preds)
        gamma = self.similarity(ctx, cond, preds[UNCOND])
        hit = active & (gamma >= self.threshold)
        use_cond = ~active | (hit if self.switch == "same" else torch.zeros_like(hit))
        self.switch_step = torch.where(hit & ~switched, torch.full_like(self.switch_step, ctx.step), self.switch_step)
        self.switched = switched | hit
        return torch.where(use_cond.view(-1, *[1] * (cond.ndim - 1)), cond, guided)
