"""`CallState`: the state of one guided pipeline call, and its NFE counts.

Apart from the hook so that what a call accumulates (steps, evaluated rows, finiteness) and how it is read back
once at the end are in one small place; the handle makes one per call and drops it when the call ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from guidance.base import StepContext

from .reference import ReferencePrompts


@dataclass
class CallState:
    """State of the pipeline call in progress."""

    scales: list[float | None]  # the call's own guidance scale, per denoiser (Wan 2.2: guidance_scale_2)
    rescale: float
    step: int = 0
    num_steps: int | None = None
    # The masks of the rows evaluated at each step, kept as they come and summed once at the end of the call
    # (a running sum would cost a few tensor operations per step on the masks' device).
    evaluated: list[torch.Tensor] = field(default_factory=list)
    # The extra branches' rows (GUIDE, PERTURBED: pipelines.branches), counted apart, per branch.
    extra_evaluated: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    # Per step, the float32 sum of the guided prediction (finite exactly when it is): 0-dim tensors on its device,
    # read once at the end of the call (a read per step would synchronise an accelerator at every step).
    finite: list[torch.Tensor] = field(default_factory=list)
    every_row: bool = True  # this step evaluates every row of both branches (set by GuidanceHandle.masks)
    guide_placed: bool = False  # the guide model's device / dtype was checked in this call
    reference: ReferencePrompts | None = None  # text pipelines: the class prompts' inputs for REF rows
    solver: dict = field(default_factory=dict)  # build_step_context's per-call state
    ctx: StepContext | None = None  # the step's context (the conditional modifier reads its samples' window)
    cond_only: bool = False  # the pipeline runs no unconditional pass (NAG alone): layouts.CondOnly
    # Adapter.denoisers_in_turn (unCLIP): the denoiser whose run is in progress, and the step at which it began.
    stage: int = 0
    stage_start: int = 0

    def end_step(self, guided: torch.Tensor, masks: dict[str, torch.Tensor], branches) -> None:
        """Record a finished step: its guided prediction's finiteness and the rows evaluated (those of the extra
        `branches` apart)."""
        # NaN and inf survive a float32 sum (a sum past 3e38 is no valid prediction either): one op per step.
        self.finite.append(guided.sum(dtype=torch.float32))
        for k, m in masks.items():
            if k in branches:
                self.extra_evaluated.setdefault(k, []).append(m)
            else:
                self.evaluated.append(m)
        self.step += 1

    def first_non_finite_step(self) -> int | None:
        """The first step whose guided prediction held NaN or inf, or None."""
        if not self.finite:
            return None
        flags = torch.isfinite(_stacked(self.finite))
        return None if bool(flags.all()) else int((~flags).nonzero()[0, 0])

    def counts(self, branches) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """(nfe, {branch: its count}) per sample on the CPU, for the extra `branches` the handle provides: None
        and {} before any step ran."""
        if not self.evaluated:
            return None, {}
        nfe = _stacked(self.evaluated).sum(0)
        extra = self.extra_evaluated
        return nfe, {b: _stacked(extra[b]).sum(0) if extra.get(b) else torch.zeros_like(nfe) for b in branches}


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The per-step tensors of a call stacked on their device and read back once (not one read per step)."""
    return torch.stack([t.to(tensors[0].device) for t in tensors]).cpu()
