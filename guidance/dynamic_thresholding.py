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

from typing import Mapping

import torch

from .base import COND, GuidanceStrategy, StepContext, check_range
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
