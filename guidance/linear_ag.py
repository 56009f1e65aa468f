"""LinearAG (Castillo et al., arXiv 2312.12487, AAAI 2025): replace unconditional evaluations by an
affine estimate from past predictions, with coefficients fitted offline by least squares.

At an "estimate" step k only the conditional branch runs; the unconditional prediction is

    eps_u_hat[k] = c[k] + sum_{l=0..H} a[k, l] * eps_c[k - l] + sum_{l=1..H} b[k, l] * eps_u[k - l]

with scalar coefficients (one per step and history term) fitted by ordinary least squares over all
samples and all latent elements of full-CFG trajectories (`fit_linear_ag`; `pipelines.linear_ag_fit`
records the trajectories from a diffusers pipeline). eps_u_hat then stands in for the unconditional
prediction of the inner rule (CFG by default).

Our reading; the paper's regression details are NOT verified (methods.md section 2.4):

- plan, per model evaluation k: "cfg" (cond + uncond, 2 NFE), "estimate" (cond + eps_u_hat,
  1 NFE), "cond" (conditional prediction only, 1 NFE). `default_plan`: the first ceil(K/2)
  evaluations alternate cfg (even k) and estimate (odd k), the rest are cond, so 20 steps cost 25
  NFE as the paper reports. The plan is data, stored with the coefficients.
- history window H (default 2): the current eps_c[k] plus eps_c and eps_u of the H previous
  evaluations. eps_u[k - l] is the one *used* at step k - l: real on cfg steps, the estimate on
  estimate steps; cond steps have none and contribute eps_c only. The fit replays this: a later
  step's regressors hold the fitted estimates of earlier estimate steps, as sampling will.
- intercept c[k]: a scalar per step, off by default.
- space: "eps" (default, the paper's noise predictions; `Parametrization.to_eps` / `from_eps`) or
  "model" (the raw model output). Flow models: eps is degenerate at s = 1 (alpha = 0) and
  `from_eps` undefined there, so fit those in "model" space.
- code: the plan and file format in `linear_ag_coefficients`, the fit in `linear_ag_regression`,
  the strategy here (all names importable from here).
- coefficients belong to one pipeline class, scheduler class, step count (and its timesteps),
  prediction type and the empty negative prompt; `LinearAG.on_call` (called by the diffusers hook)
  and every step check them. The guidance scale is recorded, not enforced.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import torch

from .base import COND, UNCOND, GuidanceStrategy, StepContext
from .call import CallDescription
from .cfg import CFG
from .linear_ag_coefficients import (  # noqa: F401  (re-exported: the plan and file format)
    CFG_STEP,
    COND_ONLY,
    ESTIMATE,
    FILE_FORMAT,
    FILE_VERSION,
    PLAN_KINDS,
    SPACES,
    LinearAGCoefficients,
    default_plan,
    history_terms,
)
from .linear_ag_regression import fit_linear_ag  # noqa: F401  (re-exported)


def _is_empty_prompt(value: Any) -> bool:
    if value is None or (isinstance(value, str) and value == ""):
        return True
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) and v == "" for v in value)


class LinearAG(GuidanceStrategy):
    """LinearAG: real CFG, CFG with a regressed unconditional prediction, or conditional only, per step.

    coefficients: LinearAGCoefficients, the path of a file it saved, or its to_config() dict.
    inner: the rule applied to (cond, real or estimated uncond) on cfg and estimate steps (CFG).
    Uncond is evaluated for every sample on cfg steps (it is the next steps' regressor), whatever
    `inner` asks. `LinearAG.unfitted(K)` gives a fit-free instance (estimate = previous uncond).
    """

    config_fields = ("coefficients", "inner")

    def __init__(self, coefficients: LinearAGCoefficients | str | os.PathLike | Mapping,
                 inner: GuidanceStrategy | None = None):
        self.coefficients = LinearAGCoefficients.coerce(coefficients)
        self.inner = CFG() if inner is None else inner
        if not isinstance(self.inner, GuidanceStrategy):
            raise ValueError(f"LinearAG: inner={inner!r} is not a guidance strategy")
        self._cond: dict[int, torch.Tensor] = {}  # step -> (B, ...) eps_c in the coefficients' space
        self._uncond: dict[int, torch.Tensor] = {}  # step -> (B, ...) eps_u as used (real or estimated)

    @classmethod
    def unfitted(cls, num_steps: int, inner: GuidanceStrategy | None = None,
                 plan: Sequence[str] | None = None, evaluations_per_step: int = 1) -> "LinearAG":
        """No fit needed: see `LinearAGCoefficients.unfitted` (default plan; plan=["cfg"] * K is CFG).
        num_steps counts model evaluations; evaluations_per_step=2 for Heun / KDPM2 (see default_plan)."""
        plan = default_plan(num_steps, evaluations_per_step=evaluations_per_step) if plan is None else plan
        return cls(LinearAGCoefficients.unfitted(num_steps, plan), inner)

    def reset(self) -> None:
        self.inner.reset()
        self._cond, self._uncond = {}, {}

    # --- compatibility -----------------------------------------------------------------------------
    def check_compatible(self, call: CallDescription) -> None:
        """ValueError naming what differs from the fit: pipeline class, scheduler class, step count."""
        c = self.coefficients
        found = {"pipeline": call.pipeline, "scheduler": call.scheduler_class,
                 "num_inference_steps": call.num_inference_steps}
        diffs = [f"{key}={getattr(c, key)!r} but this call has {key}={value!r}" for key, value in found.items()
                 if getattr(c, key) is not None and value is not None and value != getattr(c, key)]
        if diffs:
            raise ValueError(
                f"LinearAG: the coefficients were fitted for {'; '.join(diffs)}; coefficients hold only for the "
                "pipeline, scheduler and step count they were fitted on: refit with python -m pipelines.linear_ag_fit"
            )

    def on_call(self, call: CallDescription) -> None:
        self.check_compatible(call)
        if call.negative_prompt:
            given = {k: v for k, v in call.arguments.items() if k.startswith("negative_") and not _is_empty_prompt(v)}
            key, value = next(iter(given.items()), ("negative_prompt", "?"))
            shown = value if isinstance(value, (str, list, tuple)) else type(value).__name__
            raise ValueError(
                f"LinearAG: {key}={shown!r} is not supported: the coefficients estimate the unconditional branch "
                "of the empty negative prompt they were fitted with; allowed: no negative prompt (or \"\"). Use "
                "CFG or AdaptiveGuidance with negative prompts"
            )
        super().on_call(call)

    def _check_step(self, ctx: StepContext) -> str:
        c = self.coefficients
        if ctx.num_steps != c.num_steps:
            steps = "" if c.num_inference_steps is None else f" (num_inference_steps={c.num_inference_steps})"
            raise ValueError(
                f"LinearAG: the coefficients were fitted for num_steps={c.num_steps} model evaluations{steps} but "
                f"this call makes num_steps={ctx.num_steps}; allowed: the fitted step count (refit for this one "
                "with python -m pipelines.linear_ag_fit)"
            )
        if c.prediction_type is not None and ctx.param.prediction_type != c.prediction_type:
            raise ValueError(f"LinearAG: the coefficients were fitted for prediction_type={c.prediction_type!r} but "
                             f"this model predicts {ctx.param.prediction_type!r}")
        if not ctx.starts_step and ctx.step > 0 and c.plan[ctx.step] != c.plan[ctx.step - 1]:
            raise ValueError(
                f"LinearAG: evaluation {ctx.step} is the second evaluation of scheduler step {ctx.scheduler_step} but "
                f"its plan entry {c.plan[ctx.step]!r} differs from the step's first one {c.plan[ctx.step - 1]!r}; "
                "allowed: one kind per scheduler step (fit with default_plan(K, evaluations_per_step=2) on "
                "two-stage solvers such as Heun and KDPM2)"
            )
        if c.timesteps is not None and math.isfinite(ctx.timestep):
            fitted = c.timesteps[ctx.step]
            if abs(ctx.timestep - fitted) > 1e-3 * max(1.0, abs(fitted)):
                raise ValueError(
                    f"LinearAG: step {ctx.step} runs at timestep={ctx.timestep:g} but the coefficients were fitted at "
                    f"timestep={fitted:g}: same step count, other scheduler settings (spacing, shift, "
                    "resolution); refit"
                )
        return c.plan[ctx.step]

    # --- per step ------------------------------------------------------------------------------------
    def branches(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self._check_step(ctx) == CFG_STEP:
            return {**self.inner.branches(ctx), COND: ctx.all(), UNCOND: ctx.all()}
        return {COND: ctx.all(), UNCOND: ctx.none()}

    def _to_space(self, ctx: StepContext, pred: torch.Tensor) -> torch.Tensor:
        v = ctx.param.to_eps(pred) if self.coefficients.space == "eps" else pred
        return v.to(dtype=torch.promote_types(v.dtype, torch.float32), copy=True)

    def combine(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        kind = self._check_step(ctx)
        k, cond = ctx.step, preds[COND]
        for past in (self._cond, self._uncond):
            for j in [j for j in past if j < k - self.coefficients.history or j >= k]:
                del past[j]  # out of the window, or a stale step from an aborted call
        self._cond[k] = self._to_space(ctx, cond)
        if kind == COND_ONLY:
            return cond
        if kind == CFG_STEP:
            uncond = preds[UNCOND]
            self._uncond[k] = self._to_space(ctx, uncond)
        else:
            if any(v.shape != self._cond[k].shape for v in (*self._cond.values(), *self._uncond.values())):
                raise RuntimeError("LinearAG: the batch changed within one generation; history is kept per sample, "
                                   "call reset() between generations")
            estimate = self.coefficients.estimate(k, self._cond, self._uncond)
            self._uncond[k] = estimate
            if self.coefficients.space == "eps":
                if bool((ctx.param.alpha == 0).any()):
                    raise ValueError(f"LinearAG: step {k} is an estimate step at alpha=0 (flow matching at s=1), where "
                                     "eps does not determine the prediction; fit with space='model'")
                estimate = ctx.param.from_eps(estimate)
            # The estimate stays float32 and the inner rule runs on float32 inputs: a half-precision
            # estimate would add its rounding (amplified by 1/alpha in from_eps) times the scale.
            wide = estimate.dtype
            preds = {name: p.to(wide) for name, p in preds.items()}
            uncond = estimate
        inner_ctx = dataclasses.replace(ctx, evaluated={**ctx.evaluated, UNCOND: ctx.all()})
        return self.inner.combine(inner_ctx, {**preds, UNCOND: uncond}).to(cond.dtype)
