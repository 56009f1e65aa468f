"""Serialisable scale schedules: a scale that changes over the sampling steps.

Any callable `f(ctx) -> float` works as a scale; these named ones also survive `to_config()`.
The position along the trajectory is t = step / (num_steps - 1), 0 at the first evaluation and 1
at the last.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .base import StepContext, check_range

KINDS = ("linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    """`linear`: start -> end evenly; `cosine`: start -> end along a half cosine (flat at both ends)."""

    kind: str
    start: float
    end: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Schedule: kind={self.kind!r} is unknown; allowed: {', '.join(KINDS)}")
        # stored as plain floats, so that to_config() stays JSON whatever number type came in
        object.__setattr__(self, "start", check_range("Schedule", "start", self.start))
        object.__setattr__(self, "end", check_range("Schedule", "end", self.end))

    def __call__(self, ctx: StepContext) -> float:
        t = ctx.step / max(ctx.num_steps - 1, 1)
        if self.kind == "cosine":
            t = 0.5 - 0.5 * math.cos(math.pi * t)
        return self.start + (self.end - self.start) * t

    def to_config(self) -> dict:
        return {"schedule": True, **asdict(self)}

    @classmethod
    def from_config(cls, config: dict, where: str = "schedule config") -> "Schedule":
        keys = {"schedule", "kind", "start", "end"}
        if set(config) != keys:
            raise ValueError(f"{where}={dict(config)!r}: allowed: exactly the keys {sorted(keys)}, e.g. "
                             '{"schedule": true, "kind": "linear", "start": 9, "end": 3}')
        return cls(config["kind"], config["start"], config["end"])
