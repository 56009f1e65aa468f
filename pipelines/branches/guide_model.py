"""The GUIDE branch: a second denoiser (autoguidance's weaker model, or the denoiser with blocks skipped) at the
conditional inputs of the rows asked, counted in `handle.guide_nfe`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from guidance.base import GUIDE, GuidanceStrategy

from ..guide import (check_arguments, check_guide_model, check_placement, load_guide_model, named_guide_models,
                     uses_guide_model)
from ..layouts.base import DenoiserCall
from ..skip_layer import SkipLayerGuide
from .base import ConditionalRowsBranch

if TYPE_CHECKING:
    from ..hook import GuidanceHandle


class GuideModelBranch(ConditionalRowsBranch):
    name = GUIDE

    def __init__(self, handle: "GuidanceHandle", model: torch.nn.Module | SkipLayerGuide, owned: bool):
        super().__init__(handle)
        self.model, self.owned = model, owned

    @classmethod
    def resolve(cls, handle: "GuidanceHandle", guide_model) -> "GuideModelBranch | None":
        """The provider for the model given to apply_guidance, or the one the strategy names (loaded here, then
        owned: moved to the denoiser's device and dtype at each call); None when the strategy uses none. Checked
        up front."""
        strategy: GuidanceStrategy = handle.strategy
        names, name = named_guide_models(strategy), type(strategy).__name__
        if guide_model is not None and names:
            raise ValueError(f"guide_model was given to apply_guidance and {name} also names guide_model="
                             f"{sorted(names)}; allowed: one of the two")
        if len(names) > 1:
            raise ValueError(f"{name} names several guide models {sorted(names)}; allowed: one per pipeline")
        owned = guide_model is None and bool(names)
        if owned:
            guide_model = load_guide_model(next(iter(names)))
        if guide_model is None:
            if uses_guide_model(strategy):
                raise ValueError(f"{name} needs a guide model and none was given; allowed: "
                                 "apply_guidance(pipe, strategy, guide_model=model) with a denoiser of the same family "
                                 "(e.g. UNet2DModel.from_pretrained(...)), or a registered name in the strategy")
            return None
        if not uses_guide_model(strategy):
            raise ValueError(f"guide_model was given but {name} never asks for the guide model's prediction "
                             "(its uses_guide_model is False); allowed: guide_model=None, or a strategy that uses "
                             "it, e.g. Autoguidance()")
        if len(handle.denoisers) > 1:
            raise NotImplementedError(f"{handle.pipe_name} has {len(handle.denoisers)} denoisers (experts); a guide "
                                      "model is supported on single-denoiser pipelines only")
        if isinstance(guide_model, SkipLayerGuide):  # the denoiser itself, blocks skipped: check the blocks
            guide_model.stack(handle.denoiser, handle.pipe_name)
            return cls(handle, guide_model, owned)
        prediction_type = getattr(getattr(handle.pipe, "scheduler", None), "config", {}).get("prediction_type")
        check_guide_model(guide_model, handle.denoiser, handle.pipe_name, prediction_type)
        return cls(handle, guide_model, owned)

    def forward(self, call: DenoiserCall) -> Callable:
        """The guide model (through its own hooks, offloading included), or, when it is the pipeline's denoiser
        itself, its forward below our hook."""
        h, guide = self.handle, self.model
        if guide is h.denoisers[call.expert]:
            return call.forward
        if isinstance(guide, SkipLayerGuide):  # the denoiser below our hook, its blocks skipped for this call only
            return guide.bind(h.denoisers[call.expert], call.forward, h.pipe_name)
        if not h.call.guide_placed:
            dtype = getattr(h.denoiser, "dtype", None)
            param = next(guide.parameters(), None)
            if self.owned and param is not None and (param.device, param.dtype) != (call.x.device, dtype):
                guide.to(call.x.device, dtype)  # only when needed: diffusers' .to(dtype) logs a warning each time
            check_placement(guide, call.x, dtype, h.pipe_name)
            check_arguments(guide, call.kwargs, h.pipe_name)
            h.call.guide_placed = True
        return guide
