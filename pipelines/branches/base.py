"""What the extra branches share: a forward of their own, run on the conditional inputs of the rows asked."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from guidance.base import COND

from ..layouts.base import DenoiserCall
from ..layouts.rows import first, gather_rows, nan_rows

if TYPE_CHECKING:
    from ..hook import GuidanceHandle


class ConditionalRowsBranch:
    """A branch evaluated at the conditional inputs (same x_t, timestep, class ids / text embeddings) of the rows
    a strategy asks for, by `forward(call)`, in one call of only those rows."""

    name: str = ""

    def __init__(self, handle: "GuidanceHandle"):
        self.handle = handle

    def start_call(self) -> None:
        """A pipeline call begins (providers that place something for the call only do it here)."""

    def end_call(self) -> None:
        """The pipeline call ended, normally or not."""

    def evaluate_step(self, call: DenoiserCall, masks: dict, cond_rows: torch.Tensor, preds: dict,
                      ctx=None, uncond_rows: torch.Tensor | None = None) -> torch.Tensor:
        """This branch at one step, after the pipeline's own rows (`preds`); by default `evaluate` on the
        conditional rows. A provider whose input depends on those predictions (SAG's degraded input) overrides it
        and uses the step's context `ctx` and the call's `uncond_rows`, which the batched layouts give."""
        return self.evaluate(call, cond_rows, masks[self.name], preds[COND])

    def forward(self, call: DenoiserCall) -> Callable:
        """What evaluates this branch's rows of `call`."""
        raise NotImplementedError

    def evaluate(self, call: DenoiserCall, cond_rows: torch.Tensor, mask: torch.Tensor,
                 like: torch.Tensor) -> torch.Tensor:
        """The branch on the conditional rows `cond_rows[mask]` of `call`: (B, ...) like `like` (the conditional
        predictions), NaN where `mask` is False; no call at all when no row asks."""
        out = nan_rows(like, like.shape[0])
        rows = cond_rows[mask.cpu()]
        if len(rows) == 0:
            return out
        a, n = self.handle.adapter, call.x.shape[0]
        args = gather_rows(call.args, call.args, rows, rows[:0], n, a.unbatched)
        kwargs = gather_rows(call.kwargs, call.kwargs, rows, rows[:0], n, a.unbatched, a.per_frame_kws,
                             a.batch_dim_of)
        out[mask.to(out.device)] = first(self.forward(call)(*args, **kwargs)).to(out.dtype)
        return out
