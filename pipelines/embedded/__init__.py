"""The embedded default: our own class-conditional CIFAR-10 diffusion model and two classifiers,
trained by the scripts in `training/`, shipped in `weights/`, loaded with no network."""

from ..adapters import Adapter, register_adapter
from .pipeline import ClassConditionalPipeline, to_uint8

register_adapter(
    ClassConditionalPipeline,
    Adapter("unet", "uncond_cond", "guidance_scale",
            "call the pipeline with guidance_scale > 1 (the strategy's own scale, if set, still decides the strength)"),
)

__all__ = ["ClassConditionalPipeline", "to_uint8"]
