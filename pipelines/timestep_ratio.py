"""Würstchen and Stable Cascade pass their denoiser a timestep *ratio* in [0, 1] (`r` / `timestep_ratio`).

The noise level must be read at the timestep the scheduler's own step is given (pipelines.parametrization):

- with DDPMWuerstchenScheduler both pipelines step it with that very ratio (its "ratio" rule reads it);
- Stable Cascade also runs other schedulers (`Adapter.timestep_ratio == "converted"`): it then converts the loop's
  t = scheduler.timesteps[i] into the ratio for the denoiser and steps the scheduler with t itself, so the hook
  reads t there (a DDPM-type rule would index alphas_cumprod with the ratio otherwise);
- Würstchen steps any scheduler with the ratio (`"stepped"`), which only DDPMWuerstchenScheduler takes: another
  scheduler is refused rather than read at a wrong noise level.
"""

from __future__ import annotations

from .parametrization import RATIO, rule_or_none

MODES = ("stepped", "converted")


def stepped_timestep(mode: str | None, scheduler, timestep, evaluation: int, pipe_name: str):
    """The timestep the scheduler's step gets at this `evaluation` (the pipeline loop's index), from the one the
    denoiser was given."""
    if mode is None or rule_or_none(scheduler) == "ratio":
        return timestep
    if mode == "converted":
        return scheduler.timesteps[evaluation]
    raise ValueError(
        f"{pipe_name} steps its scheduler with the timestep ratio in [0, 1] it passes its denoiser, which "
        f"scheduler={type(scheduler).__name__} does not take (it expects its own timesteps); allowed: "
        f"{', '.join(RATIO)}")
