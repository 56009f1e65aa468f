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

Where similarity is measured (`similarity_space="auto"`, the default): in eps for epsilon models,
the paper's choice. Flow-matching and v-prediction models are not eps models, and their eps is
degenerate where the noise dominates: at s = 1 (a flow model's first step) and at zero terminal
SNR, x = eps exactly, so eps_c = eps_u = x, gamma = 1 and every sample would stop guidance at step
0. There "auto" measures in the model's own output (velocity, v), whose branches differ by the
x0 difference the guidance acts on.

Multi-evaluation solvers (Heun, KDPM2): the decision is made once per scheduler step, on its
first evaluation; the corrector evaluation of that step follows it (a guided predictor is never
followed by an unguided corrector).
"""

from __future__ import annotations

from typing import Mapping

import torch

from .base import COND, UNCOND, GuidanceStrategy, StepContext, check_range
from .cfg import CFG

SPACES = ("auto", "eps", "x0", "model")
SWITCHES = ("next", "same")


def cosine_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)


class AdaptiveGuidance(GuidanceStrategy):
    """Guide with `inner` (default CFG) until cond and uncond agree, then run the conditional model only.

    threshold: gamma_bar, a cosine in [-1, 1]; the paper studies 0.991-0.996 on 20-step LDMs.
    similarity_space: "auto" (default: eps for epsilon models, the raw output for flow and
    v-prediction models; see the module docstring), "eps", "x0", or "model" (raw output).
    switch: "next" (default) or "same", see the module docstring.

    After a call, `switch_step` (B,) holds the scheduler step at which each sample switched (-1:
    never) and `similarity_history` the measured gamma per scheduler step, (steps, B) (NaN where
    not measured).
    """

    config_fields = ("inner", "threshold", "similarity_space", "switch")

    def __init__(self, inner: GuidanceStrategy | None = None, threshold: float = 0.991,
                 similarity_space: str = "auto", switch: str = "next"):
        self.inner = CFG() if inner is None else inner
        if not isinstance(self.inner, GuidanceStrategy):
            raise ValueError(f"AdaptiveGuidance: inner={inner!r} is not a guidance strategy")
        self.threshold = check_range("AdaptiveGuidance", "threshold", threshold, -1.0, 1.0)
        if similarity_space not in SPACES:
            raise ValueError(f"AdaptiveGuidance: similarity_space={similarity_space!r} is unknown; "
                             f"allowed: {', '.join(SPACES)}")
        if switch not in SWITCHES:
            raise ValueError(f"AdaptiveGuidance: switch={switch!r} is unknown; allowed: {', '.join(SWITCHES)}")
        self.similarity_space = similarity_space
        self.switch = switch
        self.reset()

    def reset(self) -> None:
        self.inner.reset()
        self.switched: torch.Tensor | None = None  # (B,) bool, per sample, reset per call
        self.switch_step: torch.Tensor | None = None  # (B,) scheduler step at which each sample switched (-1: never)
        self._gammas: list[torch.Tensor] = []

    @property
    def similarity_history(self) -> torch.Tensor | None:
        return torch.stack(self._gammas) if self._gammas else None

    def _state(self, ctx: StepContext) -> torch.Tensor:
        if self.switched is None or self.switched.shape[0] != ctx.batch_size:
            self.switched = ctx.none()
            self.switch_step = torch.full((ctx.batch_size,), -1, dtype=torch.long, device=ctx.x.device)
        return self.switched

    def unguided(self, ctx: StepContext) -> torch.Tensor:
        """Samples that run the conditional model alone at this evaluation: switched at an earlier
        scheduler step, or (switch="same") at this one."""
        switched = self._state(ctx)
        before = self.switch_step < ctx.scheduler_step
        now = self.switch_step == ctx.scheduler_step
        return switched & (before | (now if self.switch == "same" else torch.zeros_like(now)))

    def branches(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        off = self.unguided(ctx)
        inner = self.inner.branches(ctx)
        return {**inner, COND: ctx.all(), UNCOND: inner.get(UNCOND, ctx.all()) & ~off}

    def space_for(self, ctx: StepContext) -> str:
        if self.similarity_space != "auto":
            return self.similarity_space
        return "eps" if ctx.param.prediction_type == "epsilon" else "model"

    def similarity(self, ctx: StepContext, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        space = self.space_for(ctx)
        if space == "eps":
            cond, uncond = ctx.param.to_eps(cond), ctx.param.to_eps(uncond)
        elif space == "x0":
            cond, uncond = ctx.to_x0(cond), ctx.to_x0(uncond)
        return cosine_per_sample(cond, uncond)

    def combine(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        off = self.unguided(ctx)
        cond = preds[COND]
        active = ~off & ctx.evaluated.get(UNCOND, ctx.all()) if ctx.evaluated else ~off
        if not bool(active.any()):
            if ctx.starts_step:
                self._gammas.append(torch.full((ctx.batch_size,), float("nan")))
            return cond
        guided = self.inner.combine(ctx, preds)
        use_cond = off
        if ctx.starts_step:  # one decision per scheduler step
            gamma = self.similarity(ctx, cond, preds[UNCOND])
            self._gammas.append(torch.where(active, gamma, torch.full_like(gamma, float("nan"))).cpu())
            hit = active & ~self.switched & (gamma >= self.threshold)
            self.switch_step = torch.where(hit, torch.full_like(self.switch_step, ctx.scheduler_step), self.switch_step)
            self.switched = self.switched | hit
            if self.switch == "same":
                use_cond = use_cond | hit
        return torch.where(use_cond.view(-1, *[1] * (cond.ndim - 1)), cond, guided.to(cond.dtype))
