"""Self-attention guidance (SAG: Hong, Lee, Jang, Kim 2023, arXiv 2210.00939).

The denoiser is run a second time at a degraded input: the step's x0 estimate blurred where the mid-block
self-attention attends most (the salient parts), noised back to the step's level with the step's own eps. Its
prediction p has lost exactly those details; guiding away from it,

    g = u + w (c - u) + s (u - p)        (without CFG, w = 1: g = c + s (c - p)),

sharpens them. Written as diffusers' `StableDiffusionSAGPipeline` computes it: with CFG on, the degraded input,
its attention map and p come from the unconditional pass (the paper's eq. 25) and the term is s (u - p); with CFG
off, from the conditional pass, s (c - p). The caller builds the degraded input from the step's predictions
(`Perturbation("self_attention_blur")`, pipelines/branches/self_attention.py); this rule only combines. The
degraded rows cost one more evaluation per sample and step, counted apart (`handle.perturbed_nfe`). One
difference from diffusers' class: the degraded call keeps the call's `cross_attention_kwargs` (a LoRA scale), which
that class drops from it.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from .base import (COND, PERTURBED, UNCOND, GuidanceStrategy, Perturbation, Scale, StepContext, check_range,
                   check_scale, resolve_scale)

# The self-attention whose map SAG reads: the first of the UNet's mid block, as diffusers' SAG pipeline.
SAG_MAP_MODULE = "mid_block.attentions.0.transformer_blocks.0.attn1"


class SAG(GuidanceStrategy):
    """g = base + s (b - p): base the CFG term (or `inner`'s rule), b the unconditional prediction where the step
    evaluates it (else the conditional), p the denoiser at b's degraded input.

    scale: w, the CFG scale (None: the call's guidance_scale; 1: SAG alone, no unconditional rows, b = c).
    sag_scale: s (diffusers' `sag_scale`, default 0.75; 0: no degraded evaluation). blur_sigma: std of the 9-tap
    Gaussian blur of x0 (diffusers' fixed 1.0). inner: another rule in place of the CFG term (APG, CFG-Zero*, ...:
    g = inner(c, u) + s (b - p)); `scale` is then the inner rule's business (leave it None). UNet pipelines only.
    """

    config_fields = ("scale", "sag_scale", "blur_sigma", "inner")

    def __init__(self, scale: Scale = None, sag_scale: float = 0.75, blur_sigma: float = 1.0,
                 inner: GuidanceStrategy | None = None):
        if inner is not None and (not isinstance(inner, GuidanceStrategy) or scale is not None):
            raise ValueError(f"SAG: inner={inner!r} with scale={scale!r}; allowed: inner a GuidanceStrategy with "
                             "scale=None (the inner rule carries its own scale), or inner=None")
        if inner is not None and inner.perturbation is not None:
            raise ValueError(f"SAG: inner={inner!r} asks for a perturbed branch of its own; allowed: an inner rule "
                             "without one (CFG, APG, CFG-Zero*, ...)")
        self.inner = inner
        self.scale = check_scale("SAG", "scale", scale)
        self.sag_scale = check_range("SAG", "sag_scale", sag_scale, 0.0)
        self.blur_sigma = check_range("SAG", "blur_sigma", blur_sigma, 0.0, low_open=True)

    @property
    def perturbation(self) -> Perturbation:  # type: ignore[override]
        return Perturbation("self_attention_blur", (SAG_MAP_MODULE,), sigma=self.blur_sigma)

    def reset(self) -> None:
        if self.inner is not None:
            self.inner.reset()

    def branches(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        degraded = ctx.all() if self.sag_scale > 0 else ctx.none()
        if self.inner is not None:
            return {**self.inner.branches(ctx), COND: ctx.all(), PERTURBED: degraded}
        off = math.isclose(resolve_scale("SAG", "scale", self.scale, ctx), 1.0)
        return {COND: ctx.all(), UNCOND: ctx.none() if off else ctx.all(), PERTURBED: degraded}

    def guide(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cond = preds[COND]
        if self.inner is not None:
            guided = self.inner.combine(ctx, {k: v for k, v in preds.items() if k != PERTURBED}).to(cond.dtype)
        else:
            w = resolve_scale("SAG", "scale", self.scale, ctx)
            guided = cond if math.isclose(w, 1.0) else preds[UNCOND] + w * (cond - preds[UNCOND])
        if self.sag_scale == 0:
            return guided
        # b: the prediction the caller degraded, per sample (the unconditional one where this step evaluated it).
        uncond = ctx.evaluated.get(UNCOND, torch.zeros(cond.shape[0], dtype=torch.bool)).to(cond.device)
        base = torch.where(uncond.view(-1, *[1] * (cond.ndim - 1)), preds[UNCOND], cond) if bool(uncond.any()) else cond
        return guided + self.sag_scale * (base - preds[PERTURBED])
