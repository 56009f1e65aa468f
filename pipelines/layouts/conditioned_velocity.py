"""Cosmos 2.5 (Cosmos2_5_PredictBasePipeline): two calls per step on one input, each branch's velocity replaced by the
ground-truth velocity on the conditioning frames before the pipeline's CFG.

The pipeline draws its noise `latents` and encodes the conditioning latents in `prepare_latents`, sets
gt = (latents - cond_latent) * cond_mask once, and at each step feeds both calls the same input (the conditioning
latents on the frames its `condition_mask` marks, its sample elsewhere), turns each output F into gt + F (1 - mask)
and guides c + s (c - u). That map is the same in both branches (gt and the mask are), so CFG on F is CFG on the
velocities. Strategies are handed what the pipeline guides and steps: the replaced velocities (`branch_predictions`)
and, as the context's sample, the scheduler's sample. On the conditioning frames that sample is not the transformer's
input: moved at the constant velocity gt, it stays on latents + (sigma - sigma_0) gt (every solver integrates a
constant velocity exactly), so the x0 read there is the one the scheduler steps with, latents - sigma_0 gt (not the
conditioning latents unless sigma_0 = 1), in every branch. The noise and the conditioning latents are read from the
pipeline's own `prepare_latents`, wrapped for the call only. A step callback that rewrites `latents` on the
conditioning frames is not seen (their sample is not an input of the transformer).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..parametrization import current_sigma
from .base import DenoiserCall
from .conditioned_frames import MASK_KW, SequentialConditionedFrames

_NONE = object()


class SequentialConditionedVelocity(SequentialConditionedFrames):
    name = "sequential_conditioned_velocity"
    description = ("two calls per step, cond then uncond, on one input with the conditioning frames written in "
                   "(condition_mask), whose velocity the pipeline replaces by the ground truth in both branches")

    def start_call(self) -> None:
        super().start_call()
        self._drawn = None  # prepare_latents' (latents, cond_latent, ...)
        self._line = None  # (gt, mask, latents, sigma_0), set at the first step
        pipe = self.handle.pipe
        self._own = pipe.__dict__.get("prepare_latents", _NONE)
        prepare = pipe.prepare_latents

        def prepare_latents(*args, **kwargs):
            self._drawn = prepare(*args, **kwargs)
            return self._drawn

        pipe.prepare_latents = prepare_latents  # an instance attribute: the class's method is untouched

    def end_call(self) -> None:
        pipe = self.handle.pipe
        if self._own is _NONE:
            pipe.__dict__.pop("prepare_latents", None)
        else:
            pipe.prepare_latents = self._own
        self._drawn = self._line = None
        super().end_call()

    def _cond(self, call: DenoiserCall):
        mask = call.kwargs.get(MASK_KW)
        if not torch.is_tensor(mask) or mask.shape[:1] != call.x.shape[:1] or mask.shape[2:] != call.x.shape[2:]:
            return super()._cond(call)  # raises, naming the mask it needs
        h = self.handle
        scheduler = h.adapter.scheduler_of(h.pipe, call.expert)
        if self._line is None:
            self._line = self._first_step(call, mask, current_sigma(scheduler))
        gt, mask, latents, sigma_0 = self._line
        sample = latents + (current_sigma(scheduler) - sigma_0) * gt  # the conditioning frames' sample
        x = torch.where(mask.bool(), sample, call.x).to(call.x.dtype)
        return super()._cond(replace(call, x=x))

    def _first_step(self, call: DenoiserCall, mask: torch.Tensor, sigma_0: float) -> tuple:
        h = self.handle
        drawn = self._drawn
        if not (isinstance(drawn, tuple) and len(drawn) >= 2 and all(torch.is_tensor(t) for t in drawn[:2])
                and drawn[0].shape == call.x.shape):
            raise NotImplementedError(
                f"{h.pipe_name}: its prepare_latents did not return (latents, cond_latent, ...) with latents of the "
                f"denoiser's input shape {tuple(call.x.shape)} in this call, so the ground-truth velocity that it "
                "writes on the conditioning frames, (latents - cond_latent) * condition_mask, is unknown")
        latents, cond_latent = drawn[0], drawn[1]
        return (latents - cond_latent) * mask, mask, latents, sigma_0  # gt as the pipeline computes it

    def branch_predictions(self, preds: dict) -> dict:
        gt, mask = self._line[0], self._line[1]
        keep = 1 - mask
        return {k: gt + v * keep for k, v in preds.items()}  # the pipeline's own gt + F (1 - mask), per branch
