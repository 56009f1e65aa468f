"""Guidance strategies as plain PyTorch: no diffusers import anywhere in this package.

A strategy declares per step which model evaluations each sample needs (`branches`), and
combines them into one guided prediction (`combine`). `pipelines.apply_guidance` runs them
inside diffusers pipelines; any custom sampling loop can call them directly.
"""

from .adaptive import AdaptiveGuidance
from .apg import APG
from .base import COND, REGISTRY, UNCOND, GuidanceStrategy, StepContext, from_config
from .cfg import CFG, rescale_to_cond_std
from .compose import Interval, Rescale
from .linear_ag import LinearAG, LinearAGCoefficients, default_plan, fit_linear_ag
from .parametrization import Parametrization
from .schedules import Schedule

__all__ = [
    "APG",
    "AdaptiveGuidance",
    "CFG",
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
    "rescale_to_cond_std",
]
