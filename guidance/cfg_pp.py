"""CFG++ (Chung, Kim, Park, Nam, Ye; arXiv 2406.08070, ICLR 2025): manifold-constrained classifier-free guidance.

CFG extrapolates past the data manifold at large scales. CFG++ keeps the guided denoised estimate but re-noises
it with the *unconditional* noise prediction; with lambda in [0, 1] in place of CFG's w (DDIM form, Algorithm 1):

    x0_lambda = x0(eps_u + lambda (eps_c - eps_u)),        x_next = alpha' x0_lambda + sigma' eps_u.

Our contract returns one prediction per step, which the pipeline's own solver then steps with. For the
first-order solvers that step x_next = alpha' x0 + sigma' eps from the prediction's (x0, eps) pair (DDIM with
eta = 0 and no x0 clipping, Euler, FlowMatch Euler; alpha', sigma' the next noise level's coefficients of the
model input), this returns the prediction whose step lands exactly on the CFG++ update: its x0* solves
alpha' x0* + sigma' (x - alpha x0*) / sigma = alpha' x0_lambda + sigma' eps_u. Other solvers step differently
(multistep history, second stages, injected noise), so they are refused rather than guided approximately.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from .base import COND, UNCOND, GuidanceStrategy, Scale, StepContext, check_scale, resolve_scale

# The solvers whose step is x_next = alpha' x0 + sigma' eps of the model's prediction (eta = 0 for DDIM).
FIRST_ORDER_SOLVERS = ("DDIMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")


class CFGPlusPlus(GuidanceStrategy):
    """CFG++ (see the module). scale: lambda, the paper's guidance scale in [0, 1] (0: the unconditional model,
    1: the conditional model's x0 re-noised with eps_u); not the CFG w of the call, so it has no "None = the
    call's" default: 0.6 is our choice within the paper's range, not a value the paper recommends.
    Exact on DDIM (eta = 0), Euler and FlowMatch Euler; other schedulers are refused.
    """

    config_fields = ("scale",)

    def __init__(self, scale: Scale = 0.6):
        if scale is None:
            raise ValueError("CFGPlusPlus: scale=None would take the call's CFG scale w, which is not CFG++'s "
                             "lambda; allowed: a number in [0, 1] (e.g. 0.6), a per-step list or a callable")
        self.scale = check_scale("CFGPlusPlus", "scale", scale)

    def on_call(self, call) -> None:
        name = call.scheduler_class
        if name is not None and name not in FIRST_ORDER_SOLVERS:
            raise ValueError(f"CFGPlusPlus: scheduler={name} does not step x_next = alpha' x0 + sigma' eps from one "
                             "prediction, so no prediction makes it take the CFG++ step; allowed: "
                             f"{', '.join(FIRST_ORDER_SOLVERS)}")
        if name == "DDIMScheduler" and call.eta not in (None, 0, 0.0):
            raise ValueError(f"CFGPlusPlus: DDIM with eta={call.eta} adds noise to its step, which CFG++ replaces "
                             "with eps_u; allowed: eta=0")
        config = call.scheduler_config
        if name == "DDIMScheduler" and (config.get("clip_sample") or config.get("thresholding")):
            raise ValueError("CFGPlusPlus: this DDIMScheduler clips the x0 of the prediction it is given "
                             "(clip_sample / thresholding), which moves the step off the CFG++ update; allowed: a "
                             "DDIMScheduler made from_config(<the scheduler's config>, clip_sample=False, "
                             "thresholding=False)")

    def combine(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        lam = resolve_scale("CFGPlusPlus", "scale", self.scale, ctx)
        if ctx.next_sigma is None:
            raise ValueError("CFGPlusPlus needs the noise level the step moves to (StepContext.next_sigma), which "
                             "this caller does not provide")
        cond, uncond = preds[COND], preds[UNCOND]
        x0_lam = ctx.to_x0(uncond + lam * (cond - uncond))  # x0 is affine in the prediction
        eps_u = ctx.param.to_eps(uncond)
        alpha_next, sigma_next = self._next_coefficients(ctx)
        x, alpha, sigma = ctx.param._promote(x0_lam)
        target = alpha_next * x0_lam + sigma_next * eps_u
        x0 = (target - (sigma_next / sigma) * x) / (alpha_next - alpha * sigma_next / sigma)
        return ctx.from_x0(x0).to(cond.dtype)

    @staticmethod
    def _next_coefficients(ctx: StepContext) -> tuple[float, float]:
        """(alpha', sigma') of the next model input, from the VE noise level sigma / alpha it moves to."""
        ve = ctx.next_sigma
        if ctx.param.prediction_type == "flow":  # x = (1 - s) x0 + s eps, sigma_ve = s / (1 - s)
            s = 1.0 if math.isinf(ve) else ve / (1.0 + ve)
            return 1.0 - s, s
        alpha = 1.0 / math.sqrt(ve * ve + 1.0)
        return alpha, ve * alpha
