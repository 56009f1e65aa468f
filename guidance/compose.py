"""Composition: wrappers that turn any strategy into a variant, as data rather than new classes.

    Interval(APG(), start=0.1, stop=0.8)          # guidance on a step-fraction window
    Interval(CFG(), sigma_min=0.28, sigma_max=5.42)  # guidance interval on sigma (Kynkaanniemi et al. 2024)
    Rescale(APG(), phi=0.7)                       # CFG-rescale on top of any rule
"""

from __future__ import annotations

from typing import Mapping

import torch

from .base import COND, GuidanceStrategy, StepContext, check_range
from .cfg import rescale_to_cond_std


def _check_inner(owner: str, inner: object) -> GuidanceStrategy:
    if not isinstance(inner, GuidanceStrategy):
        raise ValueError(f"{owner}: inner={inner!r} is not a guidance strategy; allowed: a GuidanceStrategy instance")
    return inner


class Interval(GuidanceStrategy):
    """Run `inner` only inside a window; outside it the sample gets the conditional prediction
    (w = 1) and its unconditional evaluation is skipped, which saves NFEs.

    start/stop: step fractions, active when int(start*N) <= step < int(stop*N) (diffusers guiders'
    convention). sigma_min/sigma_max: active when sigma_min < sigma <= sigma_max, with sigma the
    Karras/VE noise level (flow models: s in [0, 1]). Both windows may be given; both must hold.
    """

    config_fields = ("inner", "start", "stop", "sigma_min", "sigma_max")

    def __init__(self, inner: GuidanceStrategy, start: float = 0.0, stop: float = 1.0,
                 sigma_min: float | None = None, sigma_max: float | None = None):
        self.inner = _check_inner("Interval", inner)
        self.start = check_range("Interval", "start", start, 0.0, 1.0)
        self.stop = check_range("Interval", "stop", stop, 0.0, 1.0)
        if self.stop <= self.start:
            raise ValueError(f"Interval: stop={stop!r} is not above start={start!r}, so the window holds no step; "
                             "allowed: start < stop")
        self.sigma_min = None if sigma_min is None else check_range("Interval", "sigma_min", sigma_min, 0.0)
        self.sigma_max = None if sigma_max is None else check_range("Interval", "sigma_max", sigma_max, 0.0)
        if self.sigma_min is not None and self.sigma_max is not None and self.sigma_max < self.sigma_min:
            raise ValueError(f"Interval: sigma_max={sigma_max!r} is below sigma_min={sigma_min!r}")
        self._on: torch.Tensor | None = None  # this scheduler step's decision

    @property
    def space(self) -> str:  # type: ignore[override]
        return self.inner.space

    def reset(self) -> None:
        self.inner.reset()
        self._on: torch.Tensor | None = None

    def active(self, ctx: StepContext) -> torch.Tensor:
        """Per-sample bool (B,): is guidance on at this step.

        Decided once per scheduler step, at its first evaluation (step fractions of the scheduler
        steps, the sigma of that evaluation); a multi-evaluation solver's corrector follows it."""
        if not ctx.starts_step and self._on is not None and self._on.shape[0] == ctx.batch_size:
            return self._on
        n = ctx.num_scheduler_steps
        first, stop = int(self.start * n), int(self.stop * n)
        if first >= stop:  # said at the first step, not discovered in the images
            raise ValueError(f"Interval: the window start={self.start:g}, stop={self.stop:g} holds none of this call's "
                             f"{n} scheduler steps (it guides steps k with int(start * {n}) <= k < int(stop * {n})); "
                             f"allowed: a wider window, e.g. stop >= {(first + 1) / n:g}")
        on = ctx.all() if first <= ctx.scheduler_step < stop else ctx.none()
        if self.sigma_min is not None or self.sigma_max is not None:
            sigma = ctx.sigma.to(ctx.x.device)
            if self.sigma_min is not None:
                on = on & (sigma > self.sigma_min)
            if self.sigma_max is not None:
                on = on & (sigma <= self.sigma_max)
        self._on = on
        return on

    def branches(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        on = self.active(ctx)
        inner = self.inner.branches(ctx)
        return {name: (mask if name == COND else mask & on) for name, mask in inner.items()} | {COND: ctx.all()}

    def combine(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        on = self.active(ctx)
        if not bool(on.any()):
            return preds[COND]
        guided = self.inner.combine(ctx, preds)
        return torch.where(on.view(-1, *[1] * (guided.ndim - 1)), guided, preds[COND])


class Wrapper(GuidanceStrategy):
    """A rule around `inner`: it evaluates what `inner` asks for and changes what `inner` returns."""

    def __init__(self, inner: GuidanceStrategy):
        self.inner = _check_inner(type(self).__name__, inner)

    def reset(self) -> None:
        self.inner.reset()

    def branches(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return self.inner.branches(ctx)


RESCALE_SPACES = ("model", "v")


class Rescale(Wrapper):
    """CFG-rescale (Lin et al. 2023) applied after any rule.

    rescale_space: "model" (default) rescales the model's own output (eps, v or flow), as diffusers'
    `rescale_noise_cfg` does; "v" rescales the v-prediction (alpha eps - sigma x0) made from the guided and
    conditional x0, whatever the model predicts, which is what ComfyUI's RescaleCFG node does
    (comfy_extras/nodes_model_advanced.py, `RescaleCFG.patch`: "rescale cfg has to be done on v-pred model
    output"), so settings brought from ComfyUI give its result on epsilon models too. "v" needs a VP model
    (epsilon, v or sample prediction) and a scheduler whose noise level is known.
    """

    config_fields = ("inner", "phi", "rescale_space")

    def __init__(self, inner: GuidanceStrategy, phi: float = 0.7, rescale_space: str = "model"):
        super().__init__(inner)
        self.phi = check_range("Rescale", "phi", phi, 0.0, 1.0)
        if rescale_space not in RESCALE_SPACES:
            raise ValueError(f"Rescale: rescale_space={rescale_space!r} is unknown; allowed: "
                             f"{', '.join(RESCALE_SPACES)}")
        self.rescale_space = rescale_space

    sets_rescale = True  # its phi replaces the call's guidance_rescale

    def combine(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        guided = self.inner.combine(ctx, preds)
        if self.rescale_space == "model":
            return rescale_to_cond_std(guided, preds[COND], self.phi)
        if ctx.param.prediction_type == "flow":
            raise ValueError("Rescale: rescale_space='v' rescales the v-prediction of a VP model; this model predicts "
                             "a flow velocity (x = (1 - s) x0 + s eps), for which ComfyUI's v-space formula does not "
                             "hold; allowed here: rescale_space='model'")
        x, alpha, sigma = ctx.param._promote(guided)  # the model input and its noise level, in >= float32

        def v_of(pred: torch.Tensor) -> torch.Tensor:  # v = alpha eps - sigma x0 = (alpha x - x0) / sigma (VP)
            return (alpha * x - ctx.to_x0(pred)) / sigma

        v = rescale_to_cond_std(v_of(guided), v_of(preds[COND]), self.phi)
        return ctx.from_x0(alpha * x - sigma * v).to(guided.dtype)


