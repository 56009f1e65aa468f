"""The embedded default: our own class-conditional CIFAR-10 diffusion model and two classifiers,
trained by the scripts in `training/`, shipped in `weights/`, loaded with no network."""

from guidance.classifier import register_classifier

from ..adapters import Adapter, register_adapter
from ..guide import register_guide_model
from .classifiers import load_classifier
from .loading import CIFAR10_CLASSES, WEIGHTS_DIR, EmbeddedModel, load_embedded, load_embedded_guide
from .pipeline import ClassConditionalPipeline, to_uint8

register_adapter(
    ClassConditionalPipeline,
    Adapter("unet", "uncond_cond", "guidance_scale",
            "call the pipeline with guidance_scale > 1 (the strategy's own scale, if set, still decides the strength)",
            class_kw="class_labels"),
)

# Strategy configs (JSON) name the shipped classifiers by these names.
register_classifier("embedded-guidance", lambda: load_classifier(WEIGHTS_DIR / "guidance_classifier"))
register_classifier("embedded-eval", lambda: load_classifier(WEIGHTS_DIR / "eval_classifier"))


# Strategies name the embedded guide model (Autoguidance(guide_model="embedded")) by this name.
register_guide_model("embedded", load_embedded_guide)

__all__ = ["CIFAR10_CLASSES", "ClassConditionalPipeline", "EmbeddedModel", "WEIGHTS_DIR", "load_embedded",
           "load_embedded_guide", "to_uint8"]
