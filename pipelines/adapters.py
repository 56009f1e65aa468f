"""What the hook must know about each pipeline family: a small table, not a fork.

- layout "uncond_cond": one batched call on [uncond; cond] (SD, SDXL, SD3, PixArt, our embedded
  pipeline); the pipeline then computes u + w (c - u) on the two halves.
- layout "cond_uncond": the same with [cond; null] (DiT).
- `guide_channels_of_input`: learned-sigma models (DiT, PixArt) output 2x the input channels; only
  the first `in_channels` are a prediction of the sample, the rest pass through.
- layout "sequential": cond and uncond are two calls inside `cache_context("cond")` /
  `cache_context("uncond")` (Flux true CFG), combined by the pipeline as n + s (c - n).
"""

from __future__ import annotations

from dataclasses import dataclass

import diffusers


@dataclass(frozen=True)
class Adapter:
    denoiser: str  # attribute of the pipeline holding the denoiser
    layout: str  # "uncond_cond" | "cond_uncond" | "sequential"
    scale_kw: str  # the call keyword that holds the pipeline's own guidance scale
    enable_hint: str  # how a user turns the pipeline's own guidance on
    sample_kw: str = "sample"  # keyword of the noisy input when passed by name
    guide_channels_of_input: bool = False  # DiT: guide out[:, :in_channels], keep the rest
    unbatched: tuple[str, ...] = ()  # tensor kwargs that never carry a batch dimension
    passthrough_kws: tuple[str, ...] = ()  # a call with one of these set is not a guidance call
    class_kw: str | None = None  # class-conditional denoisers: the keyword carrying the class ids


_SD_HINT = "call the pipeline with guidance_scale > 1 (the strategy's own scale, if set, still decides the strength)"

# Class name in diffusers -> adapter. Names keep the table importable on diffusers versions that
# lack one of the classes.
DIFFUSERS_ADAPTERS: dict[str, Adapter] = {
    "StableDiffusionPipeline": Adapter("unet", "uncond_cond", "guidance_scale", _SD_HINT),
    "StableDiffusionXLPipeline": Adapter("unet", "uncond_cond", "guidance_scale", _SD_HINT),
    "StableDiffusion3Pipeline": Adapter(
        "transformer", "uncond_cond", "guidance_scale", _SD_HINT, sample_kw="hidden_states",
        passthrough_kws=("skip_layers",),  # SD3's own skip-layer guidance pass on the cond half
    ),
    # PixArt's learned-sigma channels are dropped by the pipeline after CFG: guide the eps half only.
    "PixArtAlphaPipeline": Adapter("transformer", "uncond_cond", "guidance_scale", _SD_HINT, sample_kw="hidden_states",
                                   guide_channels_of_input=True),
    "PixArtSigmaPipeline": Adapter("transformer", "uncond_cond", "guidance_scale", _SD_HINT, sample_kw="hidden_states",
                                   guide_channels_of_input=True),
    "DiTPipeline": Adapter(
        "transformer", "cond_uncond", "guidance_scale", _SD_HINT, sample_kw="hidden_states",
        guide_channels_of_input=True, class_kw="class_labels",
    ),
    "FluxPipeline": Adapter(
        "transformer", "sequential", "true_cfg_scale",
        "call the pipeline with true_cfg_scale > 1 and a negative_prompt (\"\" works): Flux runs its "
        "unconditional branch only then",
        sample_kw="hidden_states", unbatched=("txt_ids", "img_ids"),
    ),
}

# Our own pipelines register here (see pipelines/embedded/pipeline.py).
EXTRA_ADAPTERS: dict[type, Adapter] = {}


def register_adapter(pipeline_class: type, adapter: Adapter) -> None:
    """Teach `apply_guidance` a new pipeline class (e.g. a custom one following a known layout)."""
    EXTRA_ADAPTERS[pipeline_class] = adapter


def supported_pipelines() -> list[str]:
    return sorted(DIFFUSERS_ADAPTERS) + sorted(c.__name__ for c in EXTRA_ADAPTERS)


def adapter_for(pipe) -> Adapter:
    for cls, adapter in EXTRA_ADAPTERS.items():
        if isinstance(pipe, cls):
            return adapter
    for name, adapter in DIFFUSERS_ADAPTERS.items():
        cls = getattr(diffusers, name, None)
        if cls is not None and isinstance(pipe, cls):
            return adapter
    raise TypeError(
        f"pipe={type(pipe).__name__} is not supported by apply_guidance; supported pipelines: "
        f"{', '.join(supported_pipelines())} (or register one with pipelines.register_adapter)"
    )
