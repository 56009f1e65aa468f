"""diffusers integration: the guidance hook, its batch layouts (`pipelines.layouts`), the per-class
adapter table, scheduler parametrization, and the embedded default model (`load_embedded`)."""

from .adapters import REFUSED, Adapter, adapter_for, register_adapter, supported_pipelines
from .guide import register_guide_model
from .guider import StrategyGuider
from .hook import GuidanceHandle, apply_guidance
from .layouts import LAYOUTS
from .parametrization import scheduler_parametrization
from .skip_layer import SkipLayerGuide

__all__ = [
    "Adapter",
    "LAYOUTS",
    "REFUSED",
    "ClassConditionalPipeline",
    "EmbeddedModel",
    "load_embedded",
    "load_embedded_guide",
    "GuidanceHandle",
    "adapter_for",
    "apply_guidance",
    "register_adapter",
    "register_guide_model",
    "scheduler_parametrization",
    "SkipLayerGuide",
    "StrategyGuider",
    "supported_pipelines",
]
# (importing .embedded registers its adapter)
from .embedded import ClassConditionalPipeline, EmbeddedModel, load_embedded, load_embedded_guide  # noqa: E402
