"""Cosmos 2 video-to-world: two calls per step, cond then uncond, each on its own copy of the latents.

The pipeline builds each call's input anew (the conditioning latents written into the frames its `condition_mask`
marks), so the calls share no tensor to pair them by: the second call of a scheduler step (same `step_index`) is the
unconditional one, and a call at a later step while one is pending is an error (`_Sequential._cond`). The pipeline
then replaces x0 on the marked frames by the conditioning latents in both branches before its CFG; the cond call's
`condition_mask` is handed to the pipeline's preconditioning rule (`pipelines.preconditioning`, table key
"condition_mask"), so x0-space rules see the x0 it guides.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .base import DenoiserCall
from .sequential import _Sequential

MASK_KW = "condition_mask"


class SequentialConditionedFrames(_Sequential):
    name = "sequential_conditioned_frames"
    description = ("two calls per step, cond then uncond, each on its own input with the conditioning frames written "
                   "in (condition_mask), paired by call order within a scheduler step")

    def start_call(self) -> None:
        super().start_call()
        self._step = None
        self._noisy_frame: int | None | bool = False  # False: not read yet in this call

    def role(self, call: DenoiserCall) -> str | None:
        h = self.handle
        step = h.adapter.scheduler_of(h.pipe, call.expert).step_index  # a Python int (None before the first step)
        if self.pending is not None and step == self._step:
            return "uncond"
        self._step = step
        return "cond"  # with a call pending, a new step began without its uncond call: _cond raises

    def _cond(self, call: DenoiserCall):
        h = self.handle
        mask = call.kwargs.get(MASK_KW)
        if not torch.is_tensor(mask) or mask.shape[:1] != call.x.shape[:1] or mask.shape[2:] != call.x.shape[2:]:
            raise NotImplementedError(
                f"{h.pipe_name}: its denoiser was called without a {MASK_KW} of the latents' batch, frames and size "
                f"(got {tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__} for latents "
                f"{tuple(call.x.shape)}), so the frames whose x0 it replaces are unknown")
        h.call.solver.setdefault("tables", {})[MASK_KW] = mask
        timestep = call.timestep
        if torch.is_tensor(timestep) and timestep.ndim == 5:
            # per frame, (B, 1, T, 1, 1): the conditioning frames run at sigma_conditioning; the context reports
            # the timestep of the frames being denoised (the first one the mask leaves out), where there is one
            if self._noisy_frame is False:  # the mask is the same at every step of a call: read once
                noisy = torch.nonzero(mask[0, 0, :, 0, 0] == 0).flatten().tolist()
                self._noisy_frame = noisy[0] if noisy else None
            if self._noisy_frame is not None:
                timestep = timestep[:, :, self._noisy_frame].flatten()
        return super()._cond(replace(call, timestep=timestep))
