"""Dynamic thresholding (Imagen: Saharia et al. 2022, arXiv 2205.11487, Sec. 2.3), on the guided x0.

Large guidance scales push the denoised estimate x0 outside the data range, and the samples saturate. At every
step Imagen takes s, a high percentile of |x0| per sample; when s > 1 it clips x0 to [-s, s] and divides by s:

    s = clamp(quantile(|x0|, p), 1, max_value),        x0 <- clamp(x0, -s, s) / s.

Here it wraps any rule: the inner rule's guided prediction is converted to x0 with the scheduler's own noise
level, thresholded, and converted back, so the sampler steps from the thresholded x0 (the consistent
prediction, as DDIM's `use_clipped_model_output=True`, and DDPM's posterior mean). The arithmetic is diffusers'
`_threshold_sample` of its DDPM / DDIM schedulers (`thresholding=True`, `dynamic_thresholding_ratio`,
`sample_max_value`), which can only threshold CFG inside those two schedulers; this works with every rule and
scheduler. Meant for pixel-space models whose data lies in [-1, 1] (Imagen, DeepFloyd IF, the embedded model);
on latent models the range is not [-1, 1] and the rule is not the paper's.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from .base import COND, UNCOND, GuidanceStrategy, Scale, StepContext, TwoBranchRule, check_range, check_scale
from .compose import Wrapper


def threshold_x0(x0: torch.Tensor, percentile: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding of x0 per sample, computed in at least float32, returned in x0's dtype."""
    flat = x0.flatten(1)
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(flat.abs(), percentile, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


class DynamicThresholding(Wrapper):
    """Imagen's dynamic thresholding of the guided x0 (see the module): wraps `inner` (any rule, e.g. CFG()).

    percentile: p in (0, 1], the quantile of |x0| taken as s (Imagen and diffusers: 0.995).
    max_value: the largest s, >= 1 (diffusers' `sample_max_value`, default 1.0: plain clipping to [-1, 1];
    Imagen leaves s unbounded: pass a large value).
    """

    config_fields = ("inner", "percentile", "max_value")

    def __init__(self, inner: GuidanceStrategy, percentile: float = 0.995, max_value: float = 1.0):
        super().__init__(inner)
        self.percentile = check_range("DynamicThresholding", "percentile", percentile, 0.0, 1.0, low_open=True)
        self.max_value = check_range("DynamicThresholding", "max_value", max_value, 1.0)

    def combine(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        guided = self.inner.combine(ctx, preds)
        x0 = threshold_x0(ctx.to_x0(guided), self.percentile, self.max_value)
        return ctx.from_x0(x0).to(preds[COND].dtype)


# The step schedules of the WebUI extension's scale modes: the factor on (scale - minimum) at progress p in [0, 1].
MIMIC_MODES = {
    "Constant": lambda p, v: 1.0,
    "Linear Down": lambda p, v: 1.0 - p,
    "Half Cosine Down": lambda p, v: math.cos(p),
    "Cosine Down": lambda p, v: math.cos(p * 1.5707),
    "Linear Up": lambda p, v: p,
    "Half Cosine Up": lambda p, v: 1.0 - math.cos(p),
    "Cosine Up": lambda p, v: 1.0 - math.cos(p * 1.5707),
    "Power Up": lambda p, v: math.pow(p, v),
    "Power Down": lambda p, v: 1.0 - math.pow(p, v),
    "Linear Repeating": lambda p, v: (lambda q: (0.5 - q) * 2 if q < 0.5 else (q - 0.5) * 2)((p * v) % 1.0),
    "Cosine Repeating": lambda p, v: math.cos(p * 6.28318 * v) * 0.5 + 0.5,
    "Sawtooth": lambda p, v: (p * v) % 1.0,
}


def mimic_threshold(cond_x0: torch.Tensor, uncond_x0: torch.Tensor, w: float, mimic: float, percentile: float,
                    per_channel: bool, startpoint: str, measure: str) -> torch.Tensor:
    """The extension's rule on x0 (float32 or wider): CFG at scale w, recentred per channel (or per sample), its
    spread clamped and rescaled to the spread that CFG at the `mimic` scale would have."""
    dtype = cond_x0.dtype if cond_x0.dtype in (torch.float32, torch.float64) else torch.float32
    c, u = cond_x0.to(dtype), uncond_x0.to(dtype)
    mim, cfg = (u + (c - u) * mimic).flatten(2), (u + (c - u) * w).flatten(2)  # (B, C, rest)
    dims = (2,) if per_channel else (1, 2)
    mim_centered = mim - mim.mean(dim=2, keepdim=True)
    cfg_means = cfg.mean(dim=2, keepdim=True)
    cfg_centered = cfg - cfg_means
    if measure == "STD":
        mim_ref, cfg_ref = mim_centered.std(dim=dims, keepdim=True), cfg_centered.std(dim=dims, keepdim=True)
    else:  # "AD": the largest |deviation| of the mimic target, a percentile of CFG's
        mim_ref = mim_centered.abs().amax(dim=dims, keepdim=True)
        cfg_ref = torch.quantile(cfg_centered.abs().flatten(dims[0]), percentile, dim=-1)
        cfg_ref = cfg_ref.view(*cfg_ref.shape, *[1] * (3 - cfg_ref.ndim))
    if startpoint == "ZERO":
        result = cfg * (mim_ref / cfg_ref)
    elif measure == "STD":
        result = cfg_centered / cfg_ref * mim_ref + cfg_means
    else:
        bound = torch.maximum(mim_ref, cfg_ref)
        result = torch.maximum(torch.minimum(cfg_centered, bound), -bound) / bound * mim_ref + cfg_means
    return result.reshape(cond_x0.shape)


class MimicScaleThresholding(TwoBranchRule):
    """CFG at a high `scale` whose x0 keeps the spread CFG would have at `mimic_scale`: the "mimic scale" dynamic
    thresholding of the WebUI extension sd-dynamic-thresholding (mcmonkeyprojects; `DynThresh.dynthresh` in
    dynthres_core.py, also its ComfyUI node), on the x0 of both branches through the scheduler's own noise level.

    Per step: x0_m = u + mimic (c - u) and x0_w = u + w (c - u) on the predicted x0; each is centred on its mean
    over the spatial positions of every channel; CFG's deviations are clamped to max(ref_m, ref_w) (ref_m: the
    largest |deviation| of x0_m; ref_w: the `threshold_percentile` quantile of CFG's), divided by that bound,
    multiplied by ref_m, and CFG's means added back; `interpolate_phi` blends with plain CFG.

    scale: w (None: the call's guidance_scale). The extension's other knobs keep its names and defaults:
    separate_feature_channels (False pools the reference over the channels too; the extension then pools over
    the whole batch, this per sample, the same at batch 1), scaling_startpoint ("MEAN" / "ZERO"),
    variability_measure ("AD" / "STD"), and the step modes of both scales (`MIMIC_MODES`, with `*_scale_min`
    and `sched_val`), whose progress is the scheduler step over the steps - 1, as in the WebUI (the ComfyUI
    node counts 999 - timestep over 999 instead).
    """

    config_fields = ("scale", "mimic_scale", "threshold_percentile", "separate_feature_channels",
                     "scaling_startpoint", "variability_measure", "interpolate_phi", "mimic_mode", "mimic_scale_min",
                     "cfg_mode", "cfg_scale_min", "sched_val")

    def __init__(self, scale: Scale = None, mimic_scale: float = 7.0, threshold_percentile: float = 1.0,
                 separate_feature_channels: bool = True, scaling_startpoint: str = "MEAN",
                 variability_measure: str = "AD", interpolate_phi: float = 1.0, mimic_mode: str = "Constant",
                 mimic_scale_min: float = 0.0, cfg_mode: str = "Constant", cfg_scale_min: float = 0.0,
                 sched_val: float = 1.0):
        name = "MimicScaleThresholding"
        self.scale = check_scale(name, "scale", scale)
        self.mimic_scale = check_range(name, "mimic_scale", mimic_scale, 0.0)
        self.threshold_percentile = check_range(name, "threshold_percentile", threshold_percentile, 0.0, 1.0)
        self.separate_feature_channels = bool(separate_feature_channels)
        self.scaling_startpoint = _choice(name, "scaling_startpoint", scaling_startpoint, ("MEAN", "ZERO"))
        self.variability_measure = _choice(name, "variability_measure", variability_measure, ("AD", "STD"))
        self.interpolate_phi = check_range(name, "interpolate_phi", interpolate_phi, 0.0, 1.0)
        self.mimic_mode = _choice(name, "mimic_mode", mimic_mode, tuple(MIMIC_MODES))
        self.cfg_mode = _choice(name, "cfg_mode", cfg_mode, tuple(MIMIC_MODES))
        self.mimic_scale_min = check_range(name, "mimic_scale_min", mimic_scale_min, 0.0)
        self.cfg_scale_min = check_range(name, "cfg_scale_min", cfg_scale_min, 0.0)
        self.sched_val = check_range(name, "sched_val", sched_val, 0.0)

    def _scheduled(self, scale: float, mode: str, minimum: float, ctx: StepContext) -> float:
        steps = ctx.num_scheduler_steps or ctx.num_steps
        step = ctx.scheduler_step if ctx.scheduler_step is not None else ctx.step
        progress = step / max(steps - 1, 1)
        return (scale - minimum) * MIMIC_MODES[mode](progress, self.sched_val) + minimum

    def guide(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cond = preds[COND]
        w = self.current_scale(ctx)
        if self.is_off(w):
            return cond
        w = self._scheduled(w, self.cfg_mode, self.cfg_scale_min, ctx)
        mimic = self._scheduled(self.mimic_scale, self.mimic_mode, self.mimic_scale_min, ctx)
        c, u = ctx.to_x0(cond), ctx.to_x0(preds[UNCOND])
        x0 = mimic_threshold(c, u, w, mimic, self.threshold_percentile, self.separate_feature_channels,
                             self.scaling_startpoint, self.variability_measure)
        if self.interpolate_phi != 1.0:
            x0 = x0 * self.interpolate_phi + (u + w * (c - u)).to(x0.dtype) * (1.0 - self.interpolate_phi)
        return ctx.from_x0(x0.to(c.dtype)).to(cond.dtype)


def _choice(name: str, param: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}: {param}={value!r} is invalid; allowed: {', '.join(map(repr, allowed))}")
    return value
