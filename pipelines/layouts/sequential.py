"""Two denoiser calls per step: the conditional one, then the unconditional one.

The pipeline then computes n + s (c - n). The layout returns the conditional output unchanged and,
for the unconditional call, n' = (g - s c) / (1 - s), so that n' + s (c - n') = g exactly (s != 1,
checked when the call starts). Whatever the pipeline does after its CFG (Qwen-Image and Lumina 2
rescale to the conditional norm) then acts on g as it would on native CFG.

Two ways to tell the calls apart:
- `SequentialCacheContext`: the pipeline wraps them in `denoiser.cache_context("cond"/"uncond")`
  (Flux true CFG, Qwen-Image, Wan, CogView4, HunyuanVideo);
- `SequentialCallOrder`: no context (Flux img2img / inpaint / Kontext, Chroma, Lumina 2): the first
  call of a step is the conditional one, and the second is the unconditional one only if it gets
  the very same latent tensor (checked by identity, no device read); anything else is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from guidance.base import COND, UNCOND, StepContext

from .base import DenoiserCall, Layout
from .rows import first, nan_rows, replace_first, select_rows


@dataclass
class _Pending:
    ctx: StepContext
    masks: dict
    out: Any  # the conditional call's output
    x: torch.Tensor  # the latent input of the conditional call
    extra: dict  # the extra branches' predictions at the conditional inputs (GUIDE, PERTURBED)


class _Sequential(Layout):
    sequential = True

    def start_call(self) -> None:
        self.pending: _Pending | None = None

    def role(self, call: DenoiserCall) -> str | None:
        """"cond", "uncond", or None for a call that is not part of the guidance pair."""
        raise NotImplementedError

    def branch_predictions(self, preds: dict) -> dict:
        """The branches' outputs (full batch; NaN rows not evaluated) as the pipeline's CFG combines them: the
        denoiser's own, unless the pipeline transforms each branch's output first (Cosmos 2.5: conditioned_velocity)."""
        return preds

    def forward(self, call: DenoiserCall):
        role = self.role(call)
        if role == "cond":
            return self._cond(call)
        if role == "uncond":
            return self._uncond(call)
        return call.run()

    def _cond(self, call: DenoiserCall):
        h = self.handle
        if self.pending is not None:
            raise RuntimeError(
                f"{h.pipe_name}: no unconditional call followed the conditional one, so the step could not be "
                f"guided (did the pipeline switch its CFG off part-way, e.g. a CFG truncation option?); "
                f"{h.adapter.enable_hint}"
            )
        ctx = h._context(h.sample_of(call.x), call.timestep, call.expert)
        masks = h.masks(ctx)
        out = call.run(cond_rows=torch.arange(call.x.shape[0]))  # every row is conditional (NAG acts on them)
        extra = {COND: first(out)}
        h.evaluate_branches(call, masks, torch.arange(extra[COND].shape[0]), extra)  # GUIDE, PERTURBED rows
        self.pending = _Pending(ctx, masks, out, call.x, {k: v for k, v in extra.items() if k != COND})
        return out

    def _uncond(self, call: DenoiserCall):
        h = self.handle
        p, self.pending = self.pending, None
        cond = first(p.out)
        b = call.x.shape[0]
        uncond = nan_rows(cond, b)
        out = p.out
        if bool(p.masks[UNCOND].any()):
            if bool(p.masks[UNCOND].all()):
                out = call.run()
                uncond = first(out)
            else:
                rows = torch.nonzero(p.masks[UNCOND].cpu()).flatten()
                skip, dims = h.adapter.unbatched, h.adapter.batch_dim_of
                out = call.run(select_rows(call.args, rows, b, skip), select_rows(call.kwargs, rows, b, skip, dims))
                uncond[rows.to(cond.device)] = first(out)
        # combine runs at every step, as in the batched layouts (stateful rules such as LinearAG
        # guide with no unconditional evaluation at all).
        preds = self.branch_predictions({COND: cond, UNCOND: uncond} | p.extra)
        cond = preds[COND]
        g = h.combine(p.ctx, p.masks, preds, cond.shape[1])
        if out is p.out and torch.equal(g, cond):
            # n' = c makes the pipeline's n' + s (c - n') exactly c, with no model evaluation.
            return p.out
        s = h.call.scales[call.expert]
        return replace_first(out, (g - s * cond) / (1.0 - s))


class SequentialCacheContext(_Sequential):
    name = "sequential_cache_context"
    description = 'two calls per step, inside cache_context("cond") / cache_context("uncond")'

    def role(self, call: DenoiserCall) -> str | None:
        if call.context_name == "cond":
            return "cond"
        if call.context_name == "uncond" and self.pending is not None:
            return "uncond"
        return None


class SequentialCallOrder(_Sequential):
    name = "sequential_call_order"
    description = "two calls per step, cond then uncond, told apart by call order and the shared latent tensor"

    def role(self, call: DenoiserCall) -> str | None:
        if self.pending is None:
            return "cond"
        if call.x is self.pending.x:  # identity: the pipeline passes its `latents` to both calls
            return "uncond"
        return "cond"  # a new step began without an uncond call: _cond raises
