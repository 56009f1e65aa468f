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
- coefficients belong to one pipeline class, scheduler class, step count (and its timesteps),
  prediction type and the empty negative prompt; `LinearAG.on_call` (called by the diffusers hook)
  and every step check them. The guidance scale is recorded, not enforced.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .base import COND, UNCOND, GuidanceStrategy, StepContext, check_range
from .call import CallDescription
from .cfg import CFG

CFG_STEP, ESTIMATE, COND_ONLY = "cfg", "estimate", "cond"
PLAN_KINDS = (CFG_STEP, ESTIMATE, COND_ONLY)
SPACES = ("eps", "model")
FILE_FORMAT = "guidance-kit/linear-ag-coefficients"
FILE_VERSION = 1
_TENSORS = ("cond_coef", "uncond_coef", "intercept")


def default_plan(num_steps: int, guided_fraction: float = 0.5, evaluations_per_step: int = 1) -> list[str]:
    """First ceil(guided_fraction * S) scheduler steps alternate cfg / estimate, the rest are cond;
    one entry per model evaluation (K of them). S = K for single-evaluation solvers; a two-stage
    solver (evaluations_per_step=2: Heun, KDPM2) makes 2S - 1 evaluations and both of a step get
    the step's kind (one guidance decision per scheduler step)."""
    fraction = check_range("default_plan", "guided_fraction", guided_fraction, 0.0, 1.0)
    if evaluations_per_step not in (1, 2):
        raise ValueError(f"default_plan: evaluations_per_step={evaluations_per_step!r} is invalid; allowed: 1 or 2")
    steps = math.ceil(num_steps / evaluations_per_step)
    guided = math.ceil(steps * fraction)
    kinds = [(CFG_STEP if k % 2 == 0 else ESTIMATE) if k < guided else COND_ONLY for k in range(steps)]
    return [kinds[k // evaluations_per_step] for k in range(num_steps)]


def _check_history(owner: str, history: Any, low: int) -> int:
    if isinstance(history, bool) or not isinstance(history, int) or history < low:
        raise ValueError(f"{owner}: history={history!r} is invalid; allowed: an integer >= {low}")
    return history


def history_terms(plan: Sequence[str], step: int, history: int) -> list[tuple[str, int]]:
    """The regressors available at `step`: ("cond", lag) and ("uncond", lag), lag 0 = this step.

    eps_c of this step and of the `history` previous ones; eps_u of previous steps that had one
    (cfg or estimate). The fit uses exactly these; sampling can always provide them.
    """
    terms = [(COND, 0)]
    for lag in range(1, history + 1):
        j = step - lag
        if j < 0:
            break
        terms.append((COND, lag))
        if plan[j] != COND_ONLY:
            terms.append((UNCOND, lag))
    return terms


@dataclass(repr=False)
class LinearAGCoefficients:
    """Plan and regression coefficients for one pipeline, scheduler and step count.

    cond_coef[k, l] multiplies eps_c[k - l] (l = 0..H); uncond_coef[k, l] multiplies eps_u[k - l]
    (column 0 is always 0); intercept[k] is added. All float64, zero on cfg and cond steps.
    The remaining fields are provenance, checked at sampling time where not None.
    """

    plan: list[str]
    cond_coef: torch.Tensor  # (K, H + 1)
    uncond_coef: torch.Tensor  # (K, H + 1)
    intercept: torch.Tensor  # (K,)
    space: str = "eps"
    pipeline: str | None = None  # pipeline class name
    scheduler: str | None = None  # scheduler class name
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    prediction_type: str | None = None  # "epsilon", "v_prediction", "flow", "sample"
    timesteps: list[float] | None = None  # the timestep of every evaluation during the fit
    r2: list[float | None] | None = None  # per step: coefficient of determination of the fit
    # per step: 1 - ||eps_u - eps_u_hat||^2 / ||eps_u - eps_c||^2, the share of the guidance
    # direction (what CFG scales by w - 1) that the estimate gets right; R^2 alone is near 1 for
    # any model whose eps_u is close to eps_c.
    delta_r2: list[float | None] | None = None
    num_samples: int | None = None
    fit_intercept: bool = False

    def __post_init__(self) -> None:
        owner = "LinearAGCoefficients"
        self.plan = list(self.plan)
        bad = [p for p in self.plan if p not in PLAN_KINDS]
        if not self.plan or bad:
            raise ValueError(
                f"{owner}: plan={self.plan!r} is invalid; allowed: a non-empty list of {', '.join(PLAN_KINDS)}"
            )
        k = len(self.plan)
        self.cond_coef = torch.as_tensor(self.cond_coef, dtype=torch.float64).cpu()
        self.uncond_coef = torch.as_tensor(self.uncond_coef, dtype=torch.float64).cpu()
        self.intercept = torch.as_tensor(self.intercept, dtype=torch.float64).cpu().reshape(-1)
        if self.cond_coef.ndim != 2 or self.cond_coef.shape[0] != k or self.cond_coef.shape[1] < 1:
            raise ValueError(f"{owner}: cond_coef has shape {tuple(self.cond_coef.shape)}; allowed: ({k}, history + 1)")
        if self.uncond_coef.shape != self.cond_coef.shape or self.intercept.shape != (k,):
            raise ValueError(
                f"{owner}: uncond_coef {tuple(self.uncond_coef.shape)} and intercept {tuple(self.intercept.shape)} "
                f"must have shapes {tuple(self.cond_coef.shape)} and ({k},)"
            )
        for name in _TENSORS:
            if not bool(torch.isfinite(getattr(self, name)).all()):
                raise ValueError(f"{owner}: {name} has non-finite entries")
        if self.space not in SPACES:
            raise ValueError(f"{owner}: space={self.space!r} is unknown; allowed: {', '.join(SPACES)}")
        if self.timesteps is not None and len(self.timesteps) != k:
            raise ValueError(f"{owner}: {len(self.timesteps)} timesteps for a plan of {k} steps")
        for step in range(k):
            allowed = set(history_terms(self.plan, step, self.history)) if self.plan[step] == ESTIMATE else set()
            for kind, table in ((COND, self.cond_coef), (UNCOND, self.uncond_coef)):
                for lag in torch.nonzero(table[step]).flatten().tolist():
                    if (kind, lag) not in allowed:
                        raise ValueError(
                            f"{owner}: step {step} ({self.plan[step]}) has a nonzero {kind} coefficient at lag {lag}, "
                            "but that prediction is not available there; allowed: estimate steps only, on eps_c of "
                            "this and previous steps and eps_u of previous cfg/estimate steps"
                        )
            if self.plan[step] != ESTIMATE and self.intercept[step] != 0:
                raise ValueError(f"{owner}: step {step} ({self.plan[step]}) has a nonzero intercept")

    # --- views -----------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return len(self.plan)

    @property
    def history(self) -> int:
        return self.cond_coef.shape[1] - 1

    @property
    def nfe(self) -> int:
        """Model evaluations per sample that the plan costs (2 per cfg step, 1 otherwise)."""
        return sum(2 if p == CFG_STEP else 1 for p in self.plan)

    def __repr__(self) -> str:
        return (f"LinearAGCoefficients(steps={self.num_steps}, nfe={self.nfe}, history={self.history}, "
                f"space={self.space!r}, pipeline={self.pipeline!r}, scheduler={self.scheduler!r}, "
                f"guidance_scale={self.guidance_scale!r})")

    # --- the estimate ------------------------------------------------------------------------------
    def estimate(self, step: int, cond: Mapping[int, torch.Tensor], uncond: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """eps_u_hat at `step` from per-step predictions (step index -> (B, ...) tensor, in `space`)."""
        out = None
        for kind, lag in history_terms(self.plan, step, self.history):
            table, past = (self.cond_coef, cond) if kind == COND else (self.uncond_coef, uncond)
            coef = float(table[step, lag])
            if coef == 0.0:
                continue
            if step - lag not in past:
                raise RuntimeError(
                    f"LinearAG: step {step} needs the {kind} prediction of step {step - lag}, which it did not see; "
                    "a wrapper that skips LinearAG.combine on some steps breaks its history"
                )
            term = coef * past[step - lag]
            out = term if out is None else out + term
        if out is None:
            out = torch.zeros_like(cond[step])
        c = float(self.intercept[step])
        return out + c if c != 0.0 else out

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def unfitted(cls, num_steps: int, plan: Sequence[str] | None = None, history: int = 2,
                 space: str = "eps") -> "LinearAGCoefficients":
        """No fit: every estimate step reuses the previous step's unconditional prediction (a cache,
        not the paper's regression). Compatible with any pipeline; `plan=["cfg"] * K` is plain CFG."""
        plan = default_plan(num_steps) if plan is None else list(plan)
        history = _check_history("LinearAGCoefficients.unfitted", history, 1)
        cond_coef = torch.zeros(len(plan), history + 1, dtype=torch.float64)
        uncond_coef = torch.zeros_like(cond_coef)
        for step, kind in enumerate(plan):
            if kind == ESTIMATE:
                if (UNCOND, 1) not in history_terms(plan, step, history):
                    raise ValueError(
                        f"LinearAGCoefficients.unfitted: estimate step {step} has no previous unconditional prediction "
                        "to reuse; allowed: an estimate step right after a cfg or estimate step"
                    )
                uncond_coef[step, 1] = 1.0
        return cls(plan, cond_coef, uncond_coef, torch.zeros(len(plan), dtype=torch.float64), space=space)

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensors, JSON-serialisable."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _TENSORS}

    def to_config(self) -> dict[str, Any]:
        """A JSON-serialisable dict (coefficients as nested lists), rebuilt by `from_dict`."""
        return {"format": FILE_FORMAT, **self.metadata(), **{n: getattr(self, n).tolist() for n in _TENSORS}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LinearAGCoefficients":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields - {"format"}
        if data.get("format", FILE_FORMAT) != FILE_FORMAT or unknown:
            raise ValueError(
                f"LinearAGCoefficients: a dict with format={data.get('format')!r} and unknown keys {sorted(unknown)} "
                f"is not a coefficients record; allowed: the output of to_config() (format {FILE_FORMAT!r})"
            )
        return cls(**{k: v for k, v in data.items() if k != "format"})

    def save(self, path: str | os.PathLike) -> None:
        """Coefficients as float64 safetensors; plan, provenance and fit statistics as JSON metadata."""
        from safetensors.torch import save_file

        meta = {"format": FILE_FORMAT, "version": str(FILE_VERSION), "linear_ag": json.dumps(self.metadata())}
        save_file({n: getattr(self, n).contiguous() for n in _TENSORS}, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LinearAGCoefficients":
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LinearAG coefficients file {path!r} does not exist; write one with "
                                    "python -m pipelines.linear_ag_fit ... --out FILE")
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != FILE_FORMAT or set(tensors) != set(_TENSORS):
            raise ValueError(
                f"{path} is not a LinearAG coefficients file (metadata format={meta.get('format')!r}, tensors "
                f"{sorted(tensors)}; expected format {FILE_FORMAT!r} and tensors {list(_TENSORS)})"
            )
        if int(meta.get("version", 0)) > FILE_VERSION:
            raise ValueError(
                f"{path} has format version {meta['version']}; this guidance-kit reads up to {FILE_VERSION}"
            )
        return cls(**json.loads(meta["linear_ag"]), **tensors)

    @classmethod
    def coerce(cls, value: Any) -> "LinearAGCoefficients":
        if isinstance(value, cls):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls.load(value)
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise ValueError(
            f"LinearAG: coefficients={value!r} is invalid; allowed: LinearAGCoefficients, the path of a file "
            "written by LinearAGCoefficients.save, or the dict of its to_config()"
        )


def fit_linear_ag(eps_c: torch.Tensor, eps_u: torch.Tensor, plan: Sequence[str] | None = None, history: int = 2,
                  intercept: bool = False, space: str = "eps", **provenance: Any) -> LinearAGCoefficients:
    """Ordinary least squares per estimate step, over all samples and all elements, in float64.

    eps_c, eps_u: (N, K, ...) conditional / unconditional predictions in `space` along N full-CFG
    trajectories of K evaluations. Steps are fitted in order; the regressors of step k hold the
    fitted estimates of earlier estimate steps (what sampling uses), not their recorded values.
    `provenance`: the other LinearAGCoefficients fields (pipeline, scheduler, ...).
    Where a regressor is an exact combination of the others (an estimate step right after one whose
    regressors all lie in this step's window), the coefficients are not unique; `gelsd` returns the
    minimum-norm solution, which fits as well.
    """
    if eps_c.shape != eps_u.shape or eps_c.ndim < 3:
        raise ValueError(f"fit_linear_ag: eps_c {tuple(eps_c.shape)} and eps_u {tuple(eps_u.shape)} must both be "
                         "(N samples, K steps, ...)")
    n, num_steps = eps_c.shape[:2]
    plan = default_plan(num_steps) if plan is None else list(plan)
    if len(plan) != num_steps:
        raise ValueError(f"fit_linear_ag: plan has {len(plan)} entries but the trajectories have {num_steps} steps")
    history = _check_history("fit_linear_ag", history, 0)
    cond_coef = torch.zeros(num_steps, history + 1, dtype=torch.float64)
    uncond_coef = torch.zeros_like(cond_coef)
    icpt = torch.zeros(num_steps, dtype=torch.float64)
    r2: list[float | None] = [None] * num_steps
    delta_r2: list[float | None] = [None] * num_steps
    used_u: dict[int, torch.Tensor] = {}  # eps_u as sampling will see it, flattened float64 (N * D,)
    for k in range(num_steps):
        if plan[k] == CFG_STEP:
            used_u[k] = eps_u[:, k].reshape(-1).double()
        if plan[k] != ESTIMATE:
            continue
        terms = history_terms(plan, k, history)
        columns = [eps_c[:, k - lag].reshape(-1).double() if kind == COND else used_u[k - lag] for kind, lag in terms]
        if intercept:
            columns.append(torch.ones_like(columns[0]))
        x = torch.stack(columns, dim=1)
        y = eps_u[:, k].reshape(-1).double()
        solution = torch.linalg.lstsq(x.cpu(), y.cpu()[:, None], driver="gelsd").solution[:, 0]
        fitted = x @ solution.to(x.device)
        for (kind, lag), coef in zip(terms, solution.tolist()):
            (cond_coef if kind == COND else uncond_coef)[k, lag] = coef
        if intercept:
            icpt[k] = solution[-1]
        ss_tot = float(((y - y.mean()) ** 2).sum())
        ss_res = float(((y - fitted) ** 2).sum())
        ss_delta = float(((y - columns[0]) ** 2).sum())  # columns[0] is eps_c[k]
        r2[k] = 1.0 - ss_res / ss_tot if ss_tot > 0 else None
        delta_r2[k] = 1.0 - ss_res / ss_delta if ss_delta > 0 else None
        used_u[k] = fitted
    return LinearAGCoefficients(plan, cond_coef, uncond_coef, icpt, space=space, r2=r2, delta_r2=delta_r2,
                                num_samples=n, fit_intercept=bool(intercept), **provenance)


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
