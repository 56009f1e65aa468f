"""LinearAG coefficients: the plan (cfg / estimate / cond per model evaluation), the history terms
each estimate may use, and the coefficients file format (float64 safetensors + JSON provenance).
The strategy is `guidance.linear_ag.LinearAG`, the least-squares fit `guidance.linear_ag_regression`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from .base import COND, UNCOND, check_range

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
        if os.path.isdir(path):
            raise IsADirectoryError(f"LinearAG coefficients file {path!r} is a folder; pass the .safetensors file "
                                    "written by python -m pipelines.linear_ag_fit ... --out FILE")
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
