"""What pipelines/ tells strategies about a call, and the embedded evaluators it owns.

- `describe_call(pipe, arguments, adapter)`: the plain `guidance.call.CallDescription` the hook
  hands to `strategy.on_call` (guidance/ never reads the pipeline object itself).
- `vae_decoder(pipe)`: x0 latents -> images in [-1, 1] through the pipeline's VAE.
- The embedded CIFAR-10 model's trained Dynamic CFG evaluators ("alignment", "quality",
  "alignment-x0"), registered by name in `guidance.evaluators` with their weights' location here.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch

from guidance.call import CallDescription
from guidance.evaluators import (
    CleanLookahead,
    ClassifierEvaluator,
    DiscriminatorEvaluator,
    Evaluator,
    load_net,
    register_evaluator,
)

EVALUATORS_DIR = Path(__file__).resolve().parent / "embedded" / "weights" / "evaluators"
EMBEDDED_EVALUATORS = ("alignment", "quality", "alignment-x0")


def vae_decoder(pipe: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """x0 latents -> images in [-1, 1] through the pipeline's VAE; None for pixel-space pipelines.

    Uses the VAE's own `scaling_factor` / `shift_factor` as the pipelines do. Differentiable (EluCD
    back-propagates through it), so its cost is one decoder forward per step, plus a backward for
    EluCD.
    """
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return None
    scaling = getattr(vae.config, "scaling_factor", 1.0) or 1.0
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    def decode(latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(vae.dtype) / scaling + shift
        return vae.decode(z, return_dict=False)[0]

    return decode


def _given(value: Any) -> bool:
    """A negative prompt counts when it is neither None nor empty ("" or a list of "")."""
    if value is None or (isinstance(value, str) and value == ""):
        return False
    return not (isinstance(value, (list, tuple)) and all(isinstance(v, str) and v == "" for v in value))


def _prompts(arguments: Mapping[str, Any]) -> tuple[str, ...] | None:
    prompts = arguments.get("prompt")
    if prompts is None:
        return None
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    per = int(arguments.get("num_images_per_prompt") or 1)
    return tuple(p for p in prompts for _ in range(per))


def steps_denoiser_output(adapter: Any, scheduler: Any) -> bool:
    """Whether the scheduler steps the guided output a strategy returns. Not where the pipeline preconditions it
    (`preconditioning`), turns an x0 into a velocity (`x0_velocity_floor`, PRX Pixel), or steps the raw output
    while strategies see its negation (`negated_output` under invert_sigmas: Mochi, LongCat-AudioDiT), nor where it
    replaces the velocity on its conditioning frames after the hook (Cosmos 2.5's conditioned-velocity layout)."""
    inverted = bool(getattr(getattr(scheduler, "config", None), "invert_sigmas", False))
    return (adapter.preconditioning is None and adapter.x0_velocity_floor is None
            and not (adapter.negated_output and inverted) and adapter.layout != "sequential_conditioned_velocity")


def describe_call(pipe: Any, arguments: Mapping[str, Any], adapter: Any) -> CallDescription:
    """The plain description of this call (see `guidance.call.CallDescription`)."""
    scheduler = adapter.scheduler_of(pipe)
    denoiser = getattr(pipe, adapter.denoiser, None)
    steps = arguments.get("num_inference_steps")
    return CallDescription(
        pipeline=type(pipe).__name__,
        scheduler_class=None if scheduler is None else type(scheduler).__name__,
        scheduler_config=MappingProxyType(dict(getattr(scheduler, "config", {}) or {})),
        num_inference_steps=steps if isinstance(steps, int) else None,
        # Strategies need the batching kind only, not how the hook tells sequential calls apart.
        layout="sequential" if adapter.layout.startswith("sequential") else adapter.layout,
        conditioning="class" if adapter.class_kw else "text",
        negative_prompt=any(_given(v) for k, v in arguments.items() if k.startswith("negative_")),
        dtype=getattr(denoiser, "dtype", None),
        decode=vae_decoder(pipe),
        prompts=_prompts(arguments),
        generator=arguments.get("generator"),
        eta=arguments.get("eta"),
        scheduler=scheduler,
        arguments=MappingProxyType(dict(arguments)),
        steps_denoiser_output=steps_denoiser_output(adapter, scheduler),
    )


# --- the embedded model's Dynamic CFG evaluators --------------------------------------------------

def load_embedded_evaluator(kind: str, device: str | torch.device = "cpu",
                            folder: str | os.PathLike | None = None) -> Evaluator:
    """The trained evaluator of the embedded CIFAR-10 model: "alignment", "quality", or
    "alignment-x0" (the alignment classifier on the x0 estimate, `CleanLookahead`)."""
    if kind == "alignment-x0":
        return CleanLookahead(load_embedded_evaluator("alignment", device, folder), name=kind)
    if kind not in EMBEDDED_EVALUATORS:
        raise ValueError(f"evaluator={kind!r} is not a shipped evaluator; allowed: {', '.join(EMBEDDED_EVALUATORS)}"
                         " (or pass an evaluator object / callable)")
    path = Path(folder) if folder is not None else EVALUATORS_DIR / kind
    net = load_net(path, device)
    return ClassifierEvaluator(net) if kind == "alignment" else DiscriminatorEvaluator(net)


for _kind in EMBEDDED_EVALUATORS:
    register_evaluator(_kind, lambda device, kind=_kind: load_embedded_evaluator(kind, device),
                       default_for=("ClassConditionalPipeline",) if _kind in ("alignment", "quality") else ())
