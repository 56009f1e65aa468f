"""A call in which the pipeline runs no unconditional pass (Flux with true_cfg_scale <= 1, SD3 at guidance_scale
<= 1): every denoiser call is one step on the conditional rows only, and its output is used as the prediction.

Only a strategy that guides the conditional pass itself without an unconditional prediction runs here (NAG, whose
attention guidance happens inside that pass; `GuidanceHandle` picks this layout for such a call): the layout
builds the step's context, runs the conditional rows (with the conditional modifier), lets the strategy combine
and returns its prediction in place of the denoiser's output.
"""

from __future__ import annotations

import torch

from guidance.base import COND, UNCOND

from .base import DenoiserCall, Layout
from .rows import first, nan_rows, replace_first


class CondOnly(Layout):
    name = "cond_only"
    description = "one call per step on the conditional rows only (the pipeline's own CFG off)"

    def forward(self, call: DenoiserCall):
        h = self.handle
        ctx = h._context(h.sample_of(call.x), call.timestep, call.expert)
        masks = h.masks(ctx)
        if bool(masks[UNCOND].any()):
            raise ValueError(f"{h.pipe_name} runs no unconditional pass in this call, but {type(h.strategy).__name__} "
                             f"asked for it at step {ctx.step}; {h.adapter.enable_hint}")
        n = call.x.shape[0]
        out = call.run(cond_rows=torch.arange(n))
        cond = first(out)
        preds = {COND: cond, UNCOND: nan_rows(cond, n)}
        h.evaluate_branches(call, masks, torch.arange(n), preds, ctx)
        g = h.combine(ctx, masks, preds, ctx.x.shape[h.adapter.channel_dim])
        return out if g is cond else replace_first(out, g)
