"""The plain description of one pipeline call that a strategy may check before sampling.

guidance/ never reads a pipeline object: the caller (our diffusers hook, `pipelines.call.describe_call`,
or a custom loop) fills a `CallDescription` and passes it to `strategy.on_call` once per call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

LAYOUTS = ("uncond_cond", "cond_uncond", "sequential", "custom")
CONDITIONINGS = ("text", "class", "other")


@dataclass(frozen=True)
class CallDescription:
    """What a strategy may know about the call it is about to guide.

    pipeline: the pipeline's class name. scheduler_class / scheduler_config: the scheduler's class
    name and its config (a read-only mapping). num_inference_steps: the call's step count, if it
    has one. layout: how the pipeline batches its branches ("uncond_cond", "cond_uncond",
    "sequential"; "custom" for custom loops). conditioning: "text" (prompts) or "class" (class ids).
    negative_prompt: a non-empty negative prompt (or negative embeddings) was given. dtype: the
    denoiser's dtype. decode: x0 -> images in [-1, 1] (a VAE decode for latent pipelines, None for
    pixel-space ones). prompts: one prompt per sample (text pipelines). generator / eta: the call's
    own, for strategies that replay a stochastic scheduler step. scheduler: the scheduler object
    itself, opaque here, for strategies that step copies of it (DynamicCFG); None when unknown.
    arguments: the call's bound arguments with defaults applied, read-only. steps_denoiser_output: False where
    the pipeline hands its scheduler a transform of the denoiser's output rather than the output itself (the SD
    latent upscaler's and Cosmos 2's own preconditioning, PRX Pixel's x0-to-velocity conversion, Mochi's and
    LongCat-AudioDiT's raw output where strategies see its negation), so stepping a copy with the output is not its
    step.
    """

    pipeline: str
    scheduler_class: str | None = None
    scheduler_config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    num_inference_steps: int | None = None
    layout: str = "custom"
    conditioning: str = "other"
    negative_prompt: bool = False
    dtype: torch.dtype | None = None
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    prompts: tuple[str, ...] | None = None
    generator: Any = None
    eta: float | None = None
    scheduler: Any = None
    arguments: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    steps_denoiser_output: bool = True

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"CallDescription: layout={self.layout!r} is unknown; allowed: {', '.join(LAYOUTS)}")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"CallDescription: conditioning={self.conditioning!r} is unknown; allowed: "
                             f"{', '.join(CONDITIONINGS)}")
