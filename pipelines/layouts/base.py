"""What every layout receives: one denoiser call, and the handle's shared per-call services."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from .rows import first, gather_rows, nan_rows

if TYPE_CHECKING:  # the handle imports the layouts; layouts only use it
    from ..hook import GuidanceHandle


@dataclass
class DenoiserCall:
    """One call of the pipeline's denoiser, as the hook intercepted it."""

    forward: Callable  # the denoiser's original forward (below the hook)
    args: tuple
    kwargs: dict
    x: torch.Tensor  # the noisy input as the denoiser receives it (all its channels / tokens)
    timestep: Any
    context_name: str | None  # diffusers cache_context name ("cond" / "uncond"), where the pipeline sets one
    expert: int  # index of the denoiser in Adapter.denoisers (Wan 2.2 has two)

    def run(self, args: tuple | None = None, kwargs: dict | None = None):
        return self.forward(*(self.args if args is None else args), **(self.kwargs if kwargs is None else kwargs))


class Layout:
    """How a pipeline lays out its conditional and unconditional evaluations for one step.

    A layout turns the pipeline's denoiser calls into (a) a StepContext and branch masks from the
    handle, (b) evaluations of only the rows the strategy asked for, (c) the strategy's combined
    prediction, and (d) an output that the pipeline's own CFG formula maps back to exactly that
    combined prediction. NFE counting, the StepContext and per-call state live on the handle."""

    name: str = ""
    description: str = ""
    sequential: bool = False  # cond and uncond come in separate calls (needs scale != 1 to invert)

    def __init__(self, handle: "GuidanceHandle"):
        self.handle = handle

    def start_call(self) -> None:
        """A new pipeline call begins (layouts with per-call state reset it here)."""

    def end_call(self) -> None:
        """The pipeline call ended (normally or not)."""

    def forward(self, call: DenoiserCall):
        raise NotImplementedError

    def evaluate_guide(self, call: DenoiserCall, cond_rows: torch.Tensor, mask: torch.Tensor,
                       like: torch.Tensor) -> torch.Tensor:
        """The GUIDE branch: the guide model on the conditional rows `cond_rows[mask]` of this call, with
        the call's own arguments at those rows (same x_t, timestep, class ids / text embeddings), in one
        call of only those rows. Returns (B, ...) like `like` (the conditional predictions), NaN where
        `mask` is False; no call at all when no row asks."""
        out = nan_rows(like, like.shape[0])
        rows = cond_rows[mask.cpu()]
        if len(rows) == 0:
            return out
        a, n = self.handle.adapter, call.x.shape[0]
        args = gather_rows(call.args, call.args, rows, rows[:0], n, a.unbatched)
        kwargs = gather_rows(call.kwargs, call.kwargs, rows, rows[:0], n, a.unbatched, a.per_frame_kws)
        out[mask.to(out.device)] = first(self.handle.guide_forward(call)(*args, **kwargs)).to(out.dtype)
        return out
