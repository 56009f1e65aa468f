"""One small class per batch layout in which diffusers pipelines run classifier-free guidance."""

from .base import DenoiserCall, Layout
from .batched import CondUncond, UncondCond
from .conditioned_frames import SequentialConditionedFrames
from .conditioned_velocity import SequentialConditionedVelocity
from .sequential import SequentialCacheContext, SequentialCallOrder

LAYOUTS: dict[str, type[Layout]] = {
    cls.name: cls for cls in (UncondCond, CondUncond, SequentialCacheContext, SequentialCallOrder,
                              SequentialConditionedFrames, SequentialConditionedVelocity)
}

__all__ = ["LAYOUTS", "CondUncond", "DenoiserCall", "Layout", "SequentialCacheContext", "SequentialCallOrder",
           "SequentialConditionedFrames", "SequentialConditionedVelocity", "UncondCond"]
