"""The LinearAG fit: one ordinary least-squares problem per estimate step, over recorded full-CFG
trajectories (`pipelines.linear_ag_fit` records them from a diffusers pipeline)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .base import COND
from .linear_ag_coefficients import (CFG_STEP, ESTIMATE, LinearAGCoefficients, _check_history, default_plan,
                                     history_terms)


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
