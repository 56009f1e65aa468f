"""Read (alpha, sigma) of the current model evaluation from a diffusers scheduler's own state.

x0-space strategies need the exact noise level of each model call. We take it from the scheduler
rather than guessing from the timestep:

- schedulers with a `sigmas` table (Euler, Euler ancestral, Heun, DPM-Solver++, UniPC, flow
  matching, ...): sigma = sigmas[step_index], where step_index is the scheduler's own counter (or
  its begin index before the first step). Multi-evaluation solvers interleave their intermediate
  sigmas in that table, so every evaluation gets its own. VP schedulers keep sigma in the VE
  convention sqrt((1 - alphabar) / alphabar) and feed the model the VP-scaled input, so relative
  to the model input alpha = 1 / sqrt(sigma^2 + 1) and sigma_vp = sigma * alpha. Flow matching
  feeds x = (1 - s) x0 + s eps directly.
- schedulers without one (DDIM, DDPM, PNDM, LCM): alpha = sqrt(alphas_cumprod[t]) at the
  model's integer timestep t.
"""

from __future__ import annotations

import torch

from guidance.parametrization import Parametrization

# Karras-EDM schedulers precondition the model input and output themselves (c_in, c_skip, c_out);
# their outputs are not eps / v / flow of the model input, so x0 conversion is refused for them.
_PRECONDITIONED = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "CosineDPMSolverMultistepScheduler")


def prediction_type(scheduler) -> str:
    if "FlowMatch" in type(scheduler).__name__:
        return "flow"
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "flow_prediction" or getattr(scheduler.config, "use_flow_sigmas", False):
        return "flow"
    return kind


def current_sigma_index(scheduler) -> int:
    if scheduler.step_index is not None:
        return int(scheduler.step_index)
    begin = getattr(scheduler, "begin_index", None)
    return int(begin) if begin is not None else 0


def scheduler_parametrization(scheduler, timestep, model_input: torch.Tensor) -> Parametrization:
    """x = alpha * x0 + sigma * eps for the model input of the current evaluation."""
    name = type(scheduler).__name__
    if name in _PRECONDITIONED:
        raise NotImplementedError(
            f"scheduler={name}: EDM-preconditioned schedulers are not supported by x0-space strategies; "
            "use DDIM, DDPM, Euler, Euler ancestral, Heun, DPM-Solver++, UniPC or FlowMatchEuler"
        )
    kind = prediction_type(scheduler)
    shape = (model_input.shape[0],) + (1,) * (model_input.ndim - 1)
    device = model_input.device
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and sigmas.numel() > 0:
        s = sigmas[current_sigma_index(scheduler)].double()
        if kind == "flow":
            alpha, sigma = 1.0 - s, s
        else:
            alpha = 1.0 / torch.sqrt(s * s + 1.0)
            sigma = s * alpha
    else:
        t = torch.as_tensor(timestep).flatten()[0].round().long().cpu()
        abar = scheduler.alphas_cumprod[t].double()
        alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
    full = lambda v: torch.as_tensor(v, dtype=torch.float64).to(device).expand(shape)  # noqa: E731
    return Parametrization(kind, model_input, full(alpha), full(sigma))
