"""What every layout receives: one denoiser call, and the handle's shared per-call services."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch


if TYPE_CHECKING:  # the handle imports the layouts; layouts only use it
    from ..hook import GuidanceHandle


@dataclass
class DenoiserCall:
    """One call of the pipeline's denoiser, as the hook intercepted it."""

    forward: Callable  # the denoiser's original forward (below the hook)
    args: tuple
    kwargs: dict
    x: torch.Tensor  # the noisy input as the denoiser receives it (all its channels / tokens; a list of rows stacked)
    timestep: Any
    context_name: str | None  # diffusers cache_context name ("cond" / "uncond"), where the pipeline sets one
    expert: int  # index of the denoiser in Adapter.denoisers (Wan 2.2 has two)
    # (forward, cond_rows) -> forward that runs those conditional rows differently (NAG: pipelines/branches/nag.py)
    conditional: Callable | None = None

    def run(self, args: tuple | None = None, kwargs: dict | None = None, cond_rows: torch.Tensor | None = None):
        """The call (or `args` / `kwargs`: rows of it); `cond_rows`: the positions of the conditional rows in that
        batch, in sample order, for a conditional modifier (None: no conditional rows, or the layout does not say)."""
        forward = self.forward
        if cond_rows is not None and self.conditional is not None:
            forward = self.conditional(forward, cond_rows)
        return forward(*(self.args if args is None else args), **(self.kwargs if kwargs is None else kwargs))


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
