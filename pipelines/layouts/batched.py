"""One denoiser call per step on the concatenated batch [uncond; cond] (or [cond; uncond]).

The pipeline computes u + w (c - u) on the two halves afterwards; the layout returns [g; g], which
that formula maps to g for any w (u + w (g - g) = g)."""

from __future__ import annotations

import torch

from guidance.base import COND, REF, UNCOND

from .base import DenoiserCall, Layout
from .rows import first, gather_rows, nan_rows, replace_first


class UncondCond(Layout):
    name = "uncond_cond"
    description = "one batched call on [uncond; cond]"
    cond_first = False

    def start_call(self) -> None:
        self._checked = False

    def _check(self, x: torch.Tensor) -> None:
        """The batch must hold an unconditional half. The content check reads the device (a sync),
        so it runs once per pipeline call; later steps only check the (free) batch size."""
        n = x.shape[0]
        sample = self.handle.sample_of(x)  # appended conditioning may differ (SVD zeroes its image latents)
        if n % 2 == 0 and (self._checked or torch.equal(sample[: n // 2], sample[n // 2:])):
            self._checked = True
            return
        h = self.handle
        raise ValueError(
            f"{h.pipe_name}: the denoiser received a batch of {n} without an unconditional half, so "
            f"{type(h.strategy).__name__} cannot guide; {h.adapter.enable_hint}"
        )

    def forward(self, call: DenoiserCall):
        h, a = self.handle, self.handle.adapter
        x = call.x
        self._check(x)
        n = x.shape[0]
        b = n // 2
        # The halves as slices (views, no copy): the fast path below needs no index tensors.
        cond_half, uncond_half = (slice(0, b), slice(b, n)) if self.cond_first else (slice(b, n), slice(0, b))
        ctx = h._context(h.sample_of(x[:b]), call.timestep, call.expert)
        class_ids = call.kwargs.get(a.class_kw) if a.class_kw else None
        if torch.is_tensor(class_ids) and class_ids.ndim == 1 and class_ids.shape[0] == n:
            ctx.labels = class_ids[cond_half]
        masks = h.masks(ctx)
        if REF not in masks and h.call.every_row:
            out = call.run(cond_rows=torch.arange(n)[cond_half])  # the pipeline's own call (NAG: its cond rows)
            full = first(out)
            preds = {COND: full[cond_half], UNCOND: full[uncond_half]}
        else:
            cond_rows, uncond_rows = torch.arange(n)[cond_half], torch.arange(n)[uncond_half]
            out, preds = self._evaluate_rows(call, ctx, masks, cond_rows, uncond_rows)
        h.evaluate_branches(call, masks, torch.arange(n)[cond_half], preds, ctx, torch.arange(n)[uncond_half])
        g = h.combine(ctx, masks, preds, ctx.x.shape[h.adapter.channel_dim])
        return replace_first(out, torch.cat([g, g]))

    def _evaluate_rows(self, call: DenoiserCall, ctx, masks: dict, cond_rows: torch.Tensor,
                       uncond_rows: torch.Tensor):
        """One denoiser call on only the rows the strategy asked for, REF rows appended.

        REF rows are copies of the conditional rows with the class ids the strategy chose (on text
        pipelines: that class's prompt), so the reference prediction shares the batch with the other
        branches (one call, not two)."""
        h = self.handle
        n = call.x.shape[0]
        rows = torch.cat([uncond_rows[masks[UNCOND].cpu()], cond_rows[masks[COND].cpu()]]).sort().values
        ref_rows = cond_rows[masks[REF].cpu()] if REF in masks else rows[:0]
        ref_kwargs = call.kwargs
        if len(ref_rows):
            labels = h.strategy.reference_labels(ctx)[masks[REF]]
            ref_kwargs = h.reference_kwargs(call.kwargs, ref_rows, labels)
        skip, per_frame, dims = h.adapter.unbatched, h.adapter.per_frame_kws, h.adapter.batch_dim_of
        cond_at = torch.searchsorted(rows, cond_rows[masks[COND].cpu()])  # where the cond rows sit in `rows`
        out = call.run(gather_rows(call.args, call.args, rows, ref_rows, n, skip),
                       gather_rows(call.kwargs, ref_kwargs, rows, ref_rows, n, skip, per_frame, dims), cond_at)
        result = first(out)
        full = nan_rows(result, n)
        full[rows.to(full.device)] = result[: len(rows)]
        preds = {COND: full[cond_rows.to(full.device)], UNCOND: full[uncond_rows.to(full.device)]}
        if REF in masks:
            ref = nan_rows(result, n // 2)
            ref[masks[REF].to(ref.device)] = result[len(rows):]
            preds[REF] = ref
        return out, preds


class CondUncond(UncondCond):
    name = "cond_uncond"
    description = "one batched call on [cond; uncond]"
    cond_first = True
