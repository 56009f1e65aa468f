"""Guidance strategies as plain PyTorch: no diffusers import anywhere in this package.

A strategy declares per step which model evaluations each sample needs (`branches`), and
combines them into one guided prediction (`combine`). `pipelines.apply_guidance` runs them
inside diffusers pipelines; any custom sampling loop can call them directly.
"""

from .adaptive import AdaptiveGuidance
from .apg import APG
from .apg_mix import APGMix
from .autoguidance import Autoguidance
from .base import (COND, GUIDE, PERTURBED, REF, REGISTRY, UNCOND, GuidanceStrategy, StepContext, from_config, guided_prediction,
                   register_strategy)
from .call import CallDescription
from .cfg import CFG, rescale_to_cond_std
from .cfg_pp import CFGPlusPlus
from .cfg_zero_star import CFGZeroStar
from .comfyui import CFGNorm, Mahiro
from .classifier import ImageClassifier, class_prompts, register_classifier, smooth_relu
from .compose import Interval, Rescale
from .elucd import CalibratedClassifierGuidance, ClassifierGuidance
from .fdg import FDG
from .gfcg import GFCG
from .linear_ag import LinearAG, LinearAGCoefficients, default_plan, fit_linear_ag
from .mambo import MAMBOG
from .parametrization import Parametrization
from .schedules import Schedule
from .tcfg import TCFG

__all__ = [
    "APG",
    "APGMix",
    "CFGNorm",
    "CFGPlusPlus",
    "CFGZeroStar",
    "FDG",
    "Mahiro",
    "MAMBOG",
    "TCFG",
    "Autoguidance",
    "CallDescription",
    "register_strategy",
    "AdaptiveGuidance",
    "CFG",
    "CalibratedClassifierGuidance",
    "ClassifierGuidance",
    "GFCG",
    "GUIDE",
    "ImageClassifier",
    "REF",
    "class_prompts",
    "register_classifier",
    "smooth_relu",
    "COND",
    "UNCOND",
    "GuidanceStrategy",
    "Interval",
    "LinearAG",
    "LinearAGCoefficients",
    "Parametrization",
    "REGISTRY",
    "Rescale",
    "Schedule",
    "StepContext",
    "default_plan",
    "fit_linear_ag",
    "from_config",
    "guided_prediction",
    "rescale_to_cond_std",
]

from .dynamic_cfg import DynamicCFG, plot_schedules  # noqa: E402
from .dynamic_thresholding import DynamicThresholding, MimicScaleThresholding  # noqa: E402
from .pag import PAG, SEG, SLG  # noqa: E402
from .perp_neg import PerpNeg  # noqa: E402
from .sag import SAG  # noqa: E402
from .base import Perturbation  # noqa: E402

__all__ += ["DynamicCFG", "DynamicThresholding", "MimicScaleThresholding", "PAG", "PERTURBED", "PerpNeg", "SAG",
            "SEG", "SLG", "Perturbation", "plot_schedules"]

# The strategies configs may name (explicit: a user's class with one of these names cannot replace it).
for _cls in (CFG, APG, AdaptiveGuidance, Interval, Rescale, LinearAG, CalibratedClassifierGuidance,
             ClassifierGuidance, GFCG, DynamicCFG, Autoguidance, CFGZeroStar, TCFG, MAMBOG, APGMix,
             DynamicThresholding, MimicScaleThresholding, CFGNorm, Mahiro, CFGPlusPlus, FDG, PAG, SLG, SEG, SAG,
             PerpNeg):
    register_strategy(_cls)

from .nag import NAG  # noqa: E402

__all__ += ["NAG"]
register_strategy(NAG)
