"""Perturbed-attention guidance (PAG: Ahn, Cho, Min, Jang, Kim, Kim, Park, Jin, Kim 2024, arXiv 2403.17377).

The denoiser is run a second time at the conditional input with the self-attention map of chosen layers
replaced by the identity (each token keeps its own value): a prediction p that has lost the image's structure.
Guiding away from it, alone or beside CFG,

    g = u + w (c - u) + s (c - p)        (without CFG, w = 1: g = c + s (c - p)),

sharpens structure without the saturation a large w brings. Written as diffusers' PAG pipelines compute it
(`PAGMixin._apply_perturbed_attention_guidance`, with `pag_adaptive_scale`: s_t = max(s - a (1000 - t), 0)),
and layers named as their `pag_applied_layers`. diffusers' `PerturbedAttentionGuidance` guider is the same with
CFG on; without CFG it returns p + s (c - p), which is this rule at s - 1. The perturbed rows cost one more
evaluation per sample and step, counted apart (`handle.perturbed_nfe`).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from .base import COND, PERTURBED, UNCOND, GuidanceStrategy, Perturbation, Scale, StepContext, check_range, check_scale
from .base import resolve_scale


class PAG(GuidanceStrategy):
    """g = u + w (c - u) + s (c - p) with p the denoiser with identity self-attention on `layers`.

    scale: w, the CFG scale (None: the call's guidance_scale; 1: PAG alone, no unconditional pass).
    pag_scale: s (diffusers' `pag_scale`, default 3.0). layers: self-attention layers to perturb, as diffusers'
    `pag_applied_layers` (default ["mid"], the UNet's mid block; on transformers e.g. ["transformer_blocks.1"]).
    adaptive_scale: a in s_t = max(s - a (1000 - t), 0) (diffusers' `pag_adaptive_scale`, 0: constant).
    pag_start / pag_stop: the step fractions where the perturbed term runs (int(start N) <= k < int(stop N), as
    diffusers' guiders count); outside it no perturbed evaluation is made. use_original_formulation: c instead
    of u as the base (diffusers' option), so CFG is off at w = 0.
    """

    config_fields = ("scale", "pag_scale", "layers", "adaptive_scale", "pag_start", "pag_stop",
                     "use_original_formulation")

    def __init__(self, scale: Scale = None, pag_scale: float = 3.0, layers: Sequence[str] = ("mid",),
                 adaptive_scale: float = 0.0, pag_start: float = 0.0, pag_stop: float = 1.0,
                 use_original_formulation: bool = False):
        self.scale = check_scale("PAG", "scale", scale)
        self.pag_scale = check_range("PAG", "pag_scale", pag_scale, 0.0)
        self.layers = list(Perturbation("identity_attention", layers).layers)
        self.adaptive_scale = check_range("PAG", "adaptive_scale", adaptive_scale, 0.0)
        self.pag_start = check_range("PAG", "pag_start", pag_start, 0.0, 1.0)
        self.pag_stop = check_range("PAG", "pag_stop", pag_stop, 0.0, 1.0)
        if self.pag_stop <= self.pag_start:
            raise ValueError(f"PAG: pag_stop={pag_stop!r} is not above pag_start={pag_start!r}; allowed: start < stop")
        self.use_original_formulation = bool(use_original_formulation)

    @property
    def perturbation(self) -> Perturbation:  # type: ignore[override]
        return Perturbation("identity_attention", tuple(self.layers))

    def _cfg_off(self, w: float) -> bool:
        return math.isclose(w, 0.0 if self.use_original_formulation else 1.0)

    def current_pag_scale(self, ctx: StepContext) -> float:
        """s at this step: adaptive, and 0 outside [pag_start, pag_stop)."""
        n = ctx.num_scheduler_steps or ctx.num_steps
        k = ctx.scheduler_step if ctx.scheduler_step is not None else ctx.step
        if not int(self.pag_start * n) <= k < int(self.pag_stop * n):
            return 0.0
        if self.adaptive_scale == 0.0:
            return self.pag_scale
        return max(self.pag_scale - self.adaptive_scale * (1000.0 - float(ctx.timestep)), 0.0)

    def branches(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        w = resolve_scale("PAG", "scale", self.scale, ctx)
        return {COND: ctx.all(), UNCOND: ctx.none() if self._cfg_off(w) else ctx.all(),
                PERTURBED: ctx.all() if self.current_pag_scale(ctx) > 0 else ctx.none()}

    def guide(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cond = preds[COND]
        w, s = resolve_scale("PAG", "scale", self.scale, ctx), self.current_pag_scale(ctx)
        if self._cfg_off(w):
            guided = cond
        else:
            base = cond if self.use_original_formulation else preds[UNCOND]
            guided = base + w * (cond - preds[UNCOND])
        return guided + s * (cond - preds[PERTURBED]) if s > 0 else guided
