"""The x0 a strategy reads against the x0 the pipeline's scheduler steps with, over one guided call.

APG(eta=1, r=0, beta=0) equals CFG through any mutually inverse pair of conversions, so the zoo's exactness test cannot
see a wrong parametrization; this records, at every step, `ctx.to_x0` of the guided prediction and, from the scheduler's
own `step` call, the x0 its inputs imply (`x0_stepped(output, sample, index)`, index = the step's sigma index)."""

from __future__ import annotations

from typing import Callable

import torch

from guidance import CFG
from pipelines import apply_guidance


def x0_read_and_stepped(pipe, kwargs: dict, x0_stepped: Callable) -> tuple[list, list, list]:
    """(x0 read per step, x0 stepped per step, (output, sample, t) handed to each step) for one CFG call."""
    scheduler = pipe.scheduler
    read, stepped, handed = [], [], []

    class Spy(CFG):
        def guide(self, ctx, preds):
            guided = super().guide(ctx, preds)
            read.append(ctx.to_x0(guided))
            return guided

    original = scheduler.step

    def step(output, t, sample, *args, **kw):
        result = original(output, t, sample, *args, **kw)
        stepped.append(x0_stepped(output, sample, scheduler.step_index - 1))
        handed.append((output, sample, float(t)))
        return result

    scheduler.step = step
    try:
        with apply_guidance(pipe, Spy()):
            pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    finally:
        del scheduler.step
    return read, stepped, handed
