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

from .adaptive import cosine_per_sample
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
    of u as the base (diffusers' option), so CFG is off at w = 0. inner: another rule in place of the CFG term
    (APG, CFG-Zero*, ...: g = inner(c, u) + s (c - p)); `scale` is then the inner rule's business (leave it None).
    truncation: AG-style truncation of the perturbed branch (Castillo et al.'s rule, `AdaptiveGuidance`, applied
    to c and p instead of c and u): once the cosine of c and p reaches this value for a sample, its perturbed
    rows are no longer evaluated from the next scheduler step on (real NFE savings; None: never). The cosine is
    measured where AG measures it (eps for epsilon models, the model's output otherwise); after a call
    `perturbed_switch_step` (B,) holds each sample's step (-1: never).
    """

    config_fields = ("scale", "pag_scale", "layers", "adaptive_scale", "pag_start", "pag_stop",
                     "use_original_formulation", "inner", "truncation")
    window_excludes_start = False  # diffusers' SEG guider counts int(start N) < k < int(stop N)

    def __init__(self, scale: Scale = None, pag_scale: float = 3.0, layers: Sequence[str] = ("mid",),
                 adaptive_scale: float = 0.0, pag_start: float = 0.0, pag_stop: float = 1.0,
                 use_original_formulation: bool = False, inner: GuidanceStrategy | None = None,
                 truncation: float | None = None):
        self.truncation = None if truncation is None else check_range("PAG", "truncation", truncation, -1.0, 1.0)
        if inner is not None and (not isinstance(inner, GuidanceStrategy) or scale is not None):
            raise ValueError(f"PAG: inner={inner!r} with scale={scale!r}; allowed: inner a GuidanceStrategy with "
                             "scale=None (the inner rule carries its own scale), or inner=None")
        self.inner = inner
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

    def _init_blocks(self, owner: str, scale: Scale, s: float, layers: Sequence[int], blocks: str | None,
                     start: float, stop: float, use_original_formulation: bool, truncation: float | None) -> None:
        """The knobs of the rules that perturb whole transformer blocks (SLG, SEG), checked under their names."""
        if isinstance(layers, (str, bytes)) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                       for i in layers) or not len(layers):
            raise ValueError(f"{owner}: layers={layers!r} is invalid; allowed: a non-empty list of block indices "
                             "(ints >= 0), e.g. [7, 8, 9]")
        low = owner.lower()
        PAG.__init__(self, scale, pag_scale=check_range(owner, f"{low}_scale", s, 0.0), layers=("mid",),
                     pag_start=check_range(owner, f"{low}_start", start, 0.0, 1.0),
                     pag_stop=check_range(owner, f"{low}_stop", stop, 0.0, 1.0),
                     use_original_formulation=use_original_formulation, truncation=truncation)
        self.layers = sorted(layers)
        self.blocks = blocks

    def _cfg_off(self, w: float) -> bool:
        return math.isclose(w, 0.0 if self.use_original_formulation else 1.0)

    def current_pag_scale(self, ctx: StepContext) -> float:
        """s at this step: adaptive, and 0 outside [pag_start, pag_stop)."""
        n = ctx.num_scheduler_steps or ctx.num_steps
        k = ctx.scheduler_step if ctx.scheduler_step is not None else ctx.step
        first = int(self.pag_start * n)
        if not (first < k if self.window_excludes_start else first <= k) or not k < int(self.pag_stop * n):
            return 0.0
        if self.adaptive_scale == 0.0:
            return self.pag_scale
        return max(self.pag_scale - self.adaptive_scale * (1000.0 - float(ctx.timestep)), 0.0)

    def reset(self) -> None:
        if getattr(self, "inner", None) is not None:
            self.inner.reset()
        self.perturbed_switch_step: torch.Tensor | None = None  # (B,) per call: step of truncation, -1: never

    def _truncated(self, ctx: StepContext) -> torch.Tensor:
        """Samples whose perturbed branch was truncated at an earlier scheduler step."""
        if getattr(self, "perturbed_switch_step", None) is None or self.perturbed_switch_step.shape[0] != ctx.batch_size:
            self.perturbed_switch_step = torch.full((ctx.batch_size,), -1, dtype=torch.long, device=ctx.x.device)
        return (self.perturbed_switch_step >= 0) & (self.perturbed_switch_step < ctx.scheduler_step)

    def _update_truncation(self, ctx: StepContext, cond: torch.Tensor, perturbed: torch.Tensor,
                           evaluated: torch.Tensor) -> None:
        if self.truncation is None or not ctx.starts_step:  # one decision per scheduler step, as AG
            return
        eps = ctx.param.prediction_type == "epsilon"
        a, b = (ctx.param.to_eps(cond), ctx.param.to_eps(perturbed)) if eps else (cond, perturbed)
        hit = evaluated & (self.perturbed_switch_step < 0) & (cosine_per_sample(a, b) >= self.truncation)
        self.perturbed_switch_step = torch.where(hit, torch.full_like(self.perturbed_switch_step,
                                                                      ctx.scheduler_step), self.perturbed_switch_step)

    def branches(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        perturbed = (ctx.all() if self.current_pag_scale(ctx) > 0 else ctx.none()) & ~self._truncated(ctx)
        if self.inner is not None:
            return {**self.inner.branches(ctx), COND: ctx.all(), PERTURBED: perturbed}
        w = resolve_scale("PAG", "scale", self.scale, ctx)
        return {COND: ctx.all(), UNCOND: ctx.none() if self._cfg_off(w) else ctx.all(), PERTURBED: perturbed}

    def perturbed_term(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor | float:
        """s (c - p) where p was evaluated, 0 elsewhere (outside the window, truncated samples)."""
        s = self.current_pag_scale(ctx)
        if s == 0:
            return 0.0
        cond, perturbed = preds[COND], preds[PERTURBED]
        evaluated = ctx.evaluated.get(PERTURBED, ctx.all()) if ctx.evaluated else ctx.all()
        self._update_truncation(ctx, cond, perturbed, evaluated)
        if bool(evaluated.all()):
            return s * (cond - perturbed)
        return torch.where(evaluated.view(-1, *[1] * (cond.ndim - 1)), s * (cond - perturbed), 0.0)

    def guide(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cond = preds[COND]
        if self.inner is not None:
            guided = self.inner.combine(ctx, {k: v for k, v in preds.items() if k != PERTURBED}).to(cond.dtype)
            return guided + self.perturbed_term(ctx, preds)
        w = resolve_scale("PAG", "scale", self.scale, ctx)
        if self._cfg_off(w):
            guided = cond
        else:
            base = cond if self.use_original_formulation else preds[UNCOND]
            guided = base + w * (cond - preds[UNCOND])
        return guided + self.perturbed_term(ctx, preds)


class SLG(PAG):
    """Skip-layer guidance (Stability AI's, shipped with SD 3.5; diffusers' `skip_guidance_layers` of
    `StableDiffusion3Pipeline` and its `SkipLayerGuidance` guider): PAG's rule with whole transformer blocks
    skipped in the perturbed pass instead of an identity attention map,

        g = u + w (c - u) + s (c - p_skip),

    on a window of steps while CFG runs on every step. STG (spatiotemporal skip guidance, Hyung et al. 2024,
    arXiv 2411.18664) is the same rule on a video transformer's blocks.

    layers: block indices of the stack `blocks` (None: the main one; Flux: "single_transformer_blocks" too);
    SD 3.5 Medium's recommended [7, 8, 9]. slg_scale: s (2.8, the pipeline's default). slg_start / slg_stop:
    step fractions of the perturbed term (diffusers' guider counts int(start N) <= k < int(stop N); the SD3
    pipeline's own test is N start < k < N stop, so its start=0.01, stop=0.2 is this rule's window on the
    same steps only where the two agree). Denoisers whose blocks are not known are refused by name.
    """

    config_fields = ("scale", "slg_scale", "layers", "blocks", "slg_start", "slg_stop", "use_original_formulation",
                     "truncation")

    def __init__(self, scale: Scale = None, slg_scale: float = 2.8, layers: Sequence[int] = (7, 8, 9),
                 blocks: str | None = None, slg_start: float = 0.01, slg_stop: float = 0.2,
                 use_original_formulation: bool = False, truncation: float | None = None):
        self._init_blocks("SLG", scale, slg_scale, layers, blocks, slg_start, slg_stop, use_original_formulation,
                          truncation)

    @property
    def perturbation(self) -> Perturbation:  # type: ignore[override]
        return Perturbation("skip_blocks", tuple(str(i) for i in self.layers), self.blocks)

    # Its knobs under the pipeline's names (PAG's attributes hold them).
    slg_scale = property(lambda self: self.pag_scale)
    slg_start = property(lambda self: self.pag_start)
    slg_stop = property(lambda self: self.pag_stop)


class SEG(PAG):
    """Smoothed energy guidance (Hong 2024, arXiv 2408.00760): PAG's rule with the self-attention queries of
    chosen transformer blocks blurred by a Gaussian of std `blur_sigma` (a smoother energy landscape of attention)
    in the perturbed pass, as diffusers' `SmoothedEnergyGuidance` guider does (its hook, its knobs and defaults:
    seg_scale 2.8, blur_sigma 9999999, which, above 9999, replaces every query by their mean: the paper's
    infinite blur). g = u + w (c - u) + s (c - p_seg).

    layers: block indices of the stack `blocks` (None: the denoiser's main transformer stack, found as
    diffusers does; UNets: name the stack). seg_start / seg_stop: step fractions of the perturbed term, counted as
    diffusers' SEG guider counts them, int(start N) < k < int(stop N): its first step is never perturbed (its PAG
    and SLG guiders include it).
    """

    window_excludes_start = True

    config_fields = ("scale", "seg_scale", "layers", "blocks", "blur_sigma", "seg_start", "seg_stop",
                     "use_original_formulation", "truncation")

    def __init__(self, scale: Scale = None, seg_scale: float = 2.8, layers: Sequence[int] = (0,),
                 blocks: str | None = None, blur_sigma: float = 9999999.0, seg_start: float = 0.0,
                 seg_stop: float = 1.0, use_original_formulation: bool = False, truncation: float | None = None):
        self._init_blocks("SEG", scale, seg_scale, layers, blocks, seg_start, seg_stop, use_original_formulation,
                          truncation)
        self.blur_sigma = check_range("SEG", "blur_sigma", blur_sigma, 0.0, low_open=True)

    @property
    def perturbation(self) -> Perturbation:  # type: ignore[override]
        return Perturbation("blur_queries", tuple(str(i) for i in self.layers), self.blocks, self.blur_sigma)

    seg_scale = property(lambda self: self.pag_scale)
    seg_start = property(lambda self: self.pag_start)
    seg_stop = property(lambda self: self.pag_stop)
