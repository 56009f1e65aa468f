"""Autoguidance (Karras, Aittala, Kynkaanniemi, Lehtinen, Aila, Laine; NeurIPS 2024, arXiv 2406.02507):
guide a diffusion model with a bad version of itself.

The paper's rule, as its official code writes it [O: NVlabs/edm2 generate_images.py, `edm_sampler`,
`ref_Dx.lerp(Dx, guidance)` with `ref_Dx = gnet(x, t, labels)`]:

    D(x; sigma, c) = D0(x; sigma, c) + w (D1(x; sigma, c) - D0(x; sigma, c))

D1 is the main ("good") model and D0 the guide: a smaller and/or shorter-trained model of the same
family, trained on the same task and data, evaluated at the same x, noise level and condition c
(the conditional guide, unlike CFG's unconditional model) [A: abstract]. w = 1 is the main model's
conditional prediction. The paper writes D on the denoised estimate; a combination whose weights sum
to one is the same rule in eps, v or flow space at the same x_t (each is affine in x0 with the same
coefficients), so the strategy works in the model's own output space, like CFG.

Mixing with CFG, `mix` = alpha in [0, 1] (OUR READING of the paper's combination of the two guides,
its Appendix B.2, known from a secondary account [S], not read in the paper): one total weight w is
split between the guides,

    D = D1 + (w - 1) [alpha (D1 - D0) + (1 - alpha) (D1 - D1(x; sigma))],

i.e. the guiding prediction is the blend alpha D0 + (1 - alpha) D_uncond. mix=1 (default) is
autoguidance alone (no unconditional evaluation); mix=0 is CFG at scale w exactly (no guide
evaluation). D_uncond here is the main model's own unconditional prediction (the pipeline's CFG
branch); the paper's CFG results guide with a separately trained unconditional model.

Cost per step and sample: one main-model row plus one guide-model row (plus one unconditional row
when 0 < mix < 1); `GuidanceHandle.guide_nfe` counts the guide's rows apart from `nfe`.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .base import COND, GUIDE, UNCOND, GuidanceStrategy, Scale, StepContext, check_range, check_scale, resolve_scale


class Autoguidance(GuidanceStrategy):
    """guided = D_guide + w (D_cond - D_guide), the guide model evaluated at the conditional inputs.

    scale: w (None: the call's guidance_scale; a number, a per-step list or a callable, as CFG).
    mix: the share of the total guidance given to the guide model, the rest to CFG (1: autoguidance
    alone, 0: CFG; see the module docstring). guide_model: None (pass the model to
    `pipelines.apply_guidance(pipe, strategy, guide_model=...)`), or the name of a guide model
    registered with `pipelines.register_guide_model` (e.g. "embedded"), so configs can name it, or
    "skip-layers:7,8" (`pipelines.SkipLayerGuide`: the main model with blocks skipped, an approximation).
    For a guidance interval wrap it: `Interval(Autoguidance(), sigma_min=..., sigma_max=...)`.
    """

    config_fields = ("scale", "mix", "guide_model")

    def __init__(self, scale: Scale = None, mix: float = 1.0, guide_model: str | None = None):
        self.scale = check_scale("Autoguidance", "scale", scale)
        self.mix = check_range("Autoguidance", "mix", mix, 0.0, 1.0)
        if guide_model is not None and not isinstance(guide_model, str):
            raise ValueError(
                f"Autoguidance: guide_model={type(guide_model).__name__} object; allowed: None (then pass the model "
                "to pipelines.apply_guidance(pipe, strategy, guide_model=model)) or a registered guide model name"
            )
        self.guide_model = guide_model

    @property
    def uses_guide_model(self) -> bool:  # type: ignore[override]
        return self.mix > 0  # mix=0 is CFG: no guide model needed

    def branches(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        masks = {COND: ctx.all()}
        if self.mix > 0:
            masks[GUIDE] = ctx.all()
        if self.mix < 1:
            masks[UNCOND] = ctx.all()
        return masks

    def guide(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        w = resolve_scale("Autoguidance", "scale", self.scale, ctx)
        cond = preds[COND]
        if self.mix == 1:
            guiding = preds[GUIDE]
        elif self.mix == 0:
            guiding = preds[UNCOND]
        else:
            guiding = self.mix * preds[GUIDE] + (1 - self.mix) * preds[UNCOND]
        return guiding + w * (cond - guiding)  # the order of operations of CFG (and of torch.lerp's definition)
