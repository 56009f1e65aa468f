"""What the extra branches share: a forward of their own, run on the conditional inputs of the rows asked."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

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
        kwargs = gather_rows(call.kwargs, call.kwargs, rows, rows[:0], n, a.unbatched, a.per_frame_kws)
        out[mask.to(out.device)] = first(self.forward(call)(*args, **kwargs)).to(out.dtype)
        return out
