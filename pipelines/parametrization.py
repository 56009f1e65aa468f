"""Read (alpha, sigma) of the current model evaluation from a diffusers scheduler's own state.

x0-space strategies need the exact noise level of each model call. We take it from the scheduler
rather than guessing from the timestep, with one rule per known scheduler class (looked up along
the class's MRO, so subclasses inherit their parent's rule):

- "discrete" (DDIM, DDPM, LCM, TCD, PNDM, CogVideoX DDIM, ...): the model sees x_t at its integer
  timestep t, so alpha = sqrt(alphas_cumprod[t]), sigma = sqrt(1 - alphas_cumprod[t]).
- "sigmas" (Euler, Euler ancestral, Heun, LMS, KDPM2, KDPM2 ancestral, DPM-Solver++, UniPC, DEIS,
  SA-Solver, flow matching): sigma = the entry of the scheduler's sigma table that its own
  `scale_model_input` uses for this evaluation, normally sigmas[step_index] (multi-evaluation
  solvers interleave their intermediate sigmas there); KDPM2's second-stage calls use
  `sigmas_interpol` instead. VP schedulers keep sigma in the VE convention
  sqrt((1 - alphabar) / alphabar) and feed the model the VP-scaled input, so relative to the model
  input alpha = 1 / sqrt(sigma^2 + 1) and sigma_vp = sigma * alpha. Flow matching (and the
  `use_flow_sigmas` variants) feeds x = (1 - s) x0 + s eps directly.
- "unclip" (UnCLIPScheduler: unCLIP and Kandinsky priors, which predict x0, and unCLIP decoders): as
  "discrete", alphas_cumprod[t] at the timestep its step is given, without the zero-SNR floor below.
- "ratio" (DDPMWuerstchenScheduler: Würstchen, Stable Cascade): its timesteps are a continuous ratio t in
  [0, 1] (the pipelines pass it to the denoiser as `r` / `timestep_ratio` and step the scheduler with it), and
  alphabar = its own cosine `_alpha_cumprod(t)`; the model sees x_t unscaled (see `ratio_noise_level`).
- "preconditioned" (EDMEuler, EDM DPM-Solver++, Cosine DPM-Solver++): the scheduler turns the raw output F into
  x0 = c_skip x + c_out F itself, with sigma = sigmas[step_index] and its own c_in, c_skip, c_out
  (`pipelines.preconditioning`). Pipelines that precondition the output themselves (the SD latent upscaler,
  Cosmos 2 text-to-image) name their own rule in `Adapter.preconditioning`; the hook passes it in `cache`.

Zero-terminal-SNR schedules end at alphabar = 0, where an epsilon prediction does not determine x0
(diffusers' DDIM divides by zero there). We floor alphabar at 2**-24 for epsilon models, the value
diffusers' own Euler / DPM-Solver / UniPC schedulers substitute; conversions stay exact inverses of
each other, so CFG-equivalent rules are unchanged and the rest stays finite.

Schedulers we have no rule for are refused with an error naming the class; strategies that work in
the model's own output space (CFG, APG(mode="diffusers"), ...) still run there: the error is raised
only when a strategy asks for x0.
"""

from __future__ import annotations

import math

import torch

from guidance.base import StepContext
from guidance.parametrization import PREDICTION_TYPES, Parametrization

DISCRETE = ("DDIMScheduler", "DDPMScheduler", "LCMScheduler", "TCDScheduler", "PNDMScheduler",
            "DDIMParallelScheduler", "DDPMParallelScheduler", "CogVideoXDDIMScheduler")
SIGMA_TABLE = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
               "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
               "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
               "DEISMultistepScheduler", "SASolverScheduler", "FlowMatchEulerDiscreteScheduler",
               "FlowMatchHeunDiscreteScheduler")
# Karras-EDM schedulers precondition the model input and output themselves (c_in, c_skip, c_out).
PRECONDITIONED = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "CosineDPMSolverMultistepScheduler")
UNCLIP = ("UnCLIPScheduler",)  # unCLIP / Kandinsky priors and decoders: see unclip_noise_level
RATIO = ("DDPMWuerstchenScheduler",)  # a continuous timestep ratio in [0, 1]: see ratio_noise_level
SUPPORTED = DISCRETE + SIGMA_TABLE + UNCLIP + RATIO + PRECONDITIONED
ZERO_SNR_FLOOR = 2.0**-24  # alphabar floor for epsilon models (diffusers' Euler/DPM/UniPC use the same)


class UnsupportedScheduler(ValueError):
    """The noise level of this scheduler's model evaluations cannot be read exactly."""


def is_scheduler_class(cls) -> bool:
    """A concrete diffusers scheduler class: not a name, an instance, or SchedulerMixin itself."""
    from diffusers import SchedulerMixin

    return isinstance(cls, type) and issubclass(cls, SchedulerMixin) and cls is not SchedulerMixin


def rule(scheduler) -> str:
    """"discrete", "sigmas", "unclip", "ratio" or "preconditioned" for a known scheduler class (or a subclass of
    one); raises otherwise."""
    for cls in type(scheduler).__mro__:
        if cls.__name__ in PRECONDITIONED:
            return "preconditioned"
        if cls.__name__ in DISCRETE:
            return "discrete"
        if cls.__name__ in SIGMA_TABLE:
            return "sigmas"
        if cls.__name__ in UNCLIP:
            return "unclip"
        if cls.__name__ in RATIO:
            return "ratio"
    raise UnsupportedScheduler(
        f"scheduler={type(scheduler).__name__}: its noise level per model evaluation is unknown to guidance-kit, so "
        f"x0-space strategies cannot convert its predictions (we do not guess); allowed: {', '.join(SUPPORTED)}"
    )


def prediction_type(scheduler) -> str:
    if "FlowMatch" in type(scheduler).__name__:
        return "flow"
    kind = getattr(scheduler.config, "prediction_type", "epsilon")
    if kind == "flow_prediction" or getattr(scheduler.config, "use_flow_sigmas", False):
        return "flow"
    return kind


def _floats(scheduler, name: str, cache: dict | None) -> list[float]:
    """`scheduler.<name>` (sigmas, sigmas_interpol, alphas_cumprod, timesteps) as float64 Python numbers.

    The hook passes its per-call dict as `cache`: the table is read from the device once per pipeline call
    instead of at every step (no per-step transfer, no host-device sync). A table the scheduler replaces
    (`set_timesteps` makes new tensors) is read again."""
    table = getattr(scheduler, name)
    if cache is not None and name in cache and cache[name][0] is table:
        return cache[name][1]
    values = table.detach().double().cpu().tolist()
    if cache is not None:
        cache[name] = (table, values)
    return values


def timestep_value(timestep) -> float:
    """The timestep as a Python number (one read of the first element; NaN when there is none)."""
    if timestep is None:
        return float("nan")
    if isinstance(timestep, (int, float)):
        return float(timestep)
    if torch.is_tensor(timestep) and timestep.numel() == 1:
        return timestep.item()  # the usual case: one read, no indexing ops
    return torch.as_tensor(timestep).reshape(-1)[0].item()


def current_sigma_index(scheduler, timestep=None, cache: dict | None = None) -> int:
    """The sigma-table index of the coming evaluation: the scheduler's step index, else its begin index, else 0
    (before its first step). A pipeline that enters the schedule part-way without set_begin_index (Wan
    video-to-video) sets `first_step_from_timestep` in `cache` (its adapter row says so): the index is then the
    one the scheduler's own `_init_step_index` will pick from the timestep. Not by default: many pipelines pass
    the denoiser a timestep in other units than the scheduler's (PRX: t / 1000), where that lookup would
    match the wrong entry."""
    if scheduler.step_index is not None:
        return int(scheduler.step_index)
    begin = getattr(scheduler, "begin_index", None)
    if begin is not None:
        return int(begin)
    if timestep is not None and cache is not None and cache.get("first_step_from_timestep"):
        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        return int(scheduler.index_for_timestep(t.reshape(-1)[0].to(scheduler.timesteps.device)))
    return 0


def current_sigma(scheduler, cache: dict | None = None, timestep=None) -> float:
    """The sigma-table entry of this evaluation: the one the scheduler's `scale_model_input` and
    `step` use (KDPM2's second-stage evaluations run at an interpolated sigma)."""
    i = current_sigma_index(scheduler, timestep, cache)
    second_stage = not getattr(scheduler, "state_in_first_order", True)
    names = {cls.__name__ for cls in type(scheduler).__mro__}
    if second_stage and "KDPM2AncestralDiscreteScheduler" in names:
        return _floats(scheduler, "sigmas_interpol", cache)[i - 1]
    if second_stage and "KDPM2DiscreteScheduler" in names:
        return _floats(scheduler, "sigmas_interpol", cache)[i]
    return _floats(scheduler, "sigmas", cache)[i]


def scheduler_parametrization(scheduler, timestep, model_input: torch.Tensor,
                              cache: dict | None = None) -> Parametrization:
    """x = alpha * x0 + sigma * eps for the model input of the current evaluation.

    Raises `UnsupportedScheduler` (a ValueError naming the class and the supported ones) when the
    noise level cannot be read exactly; see `step_parametrization` for the lenient form. `cache`: a
    per-call dict for the scheduler's tables (see `_floats`). The arithmetic is float64 on Python
    numbers (IEEE-identical to the same float64 tensor operations)."""
    from .preconditioning import PIPELINE_RULES, edm_parametrization  # it imports this module

    if cache is not None and cache.get("preconditioning") is not None:  # the pipeline's own (Adapter.preconditioning)
        return PIPELINE_RULES[cache["preconditioning"]](scheduler, timestep, model_input, cache)
    kind = prediction_type(scheduler)
    if kind not in PREDICTION_TYPES:
        raise UnsupportedScheduler(f"scheduler={type(scheduler).__name__}: prediction_type={kind!r} is not supported; "
                                   f"allowed: {', '.join(PREDICTION_TYPES)}")
    how = rule(scheduler)
    if how == "preconditioned":
        return edm_parametrization(scheduler, timestep, model_input, cache)
    shape = (model_input.shape[0],) + (1,) * (model_input.ndim - 1)
    if how == "sigmas":
        s = current_sigma(scheduler, cache, timestep)
        if kind == "flow" and getattr(scheduler.config, "invert_sigmas", False):
            s = 1.0 - s  # Mochi's schedule holds the data fraction 1 - s (its model predicts x0 - eps)
        if kind == "flow":
            alpha, sigma = 1.0 - s, s
        else:
            alpha = 1.0 / math.sqrt(s * s + 1.0)
            sigma = s * alpha
    elif how == "unclip":
        alpha, sigma = unclip_noise_level(scheduler, timestep, cache)
    elif how == "ratio":
        alpha, sigma = ratio_noise_level(scheduler, timestep)
    else:
        abar = _floats(scheduler, "alphas_cumprod", cache)[round(timestep_value(timestep))]
        if kind == "epsilon":
            abar = max(abar, ZERO_SNR_FLOOR)
        alpha, sigma = math.sqrt(abar), math.sqrt(1.0 - abar)
    full = lambda v: torch.full(shape, v, dtype=torch.float64, device=model_input.device)  # noqa: E731
    return Parametrization(kind, model_input, full(alpha), full(sigma))


def unclip_noise_level(scheduler, timestep, cache: dict | None = None) -> tuple[float, float]:
    """(alpha, sigma) of UnCLIPScheduler's model input: its step reads alphas_cumprod[t] at the timestep it is
    given (prev_timestep only sets where it moves to, and its beta), for "epsilon" decoders and "sample" (x0) priors
    alike. Not floored: its squaredcos_cap_v2 table ends at alphabar 2.4e-9 > 0 (t = 999, where every call starts),
    which its step divides by as it is."""
    abar = _floats(scheduler, "alphas_cumprod", cache)[round(timestep_value(timestep))]
    return math.sqrt(abar), math.sqrt(1.0 - abar)


def _ratio_alpha_cumprod(scheduler, t: float) -> float:
    """DDPMWuerstchenScheduler's alphabar at ratio t, by its own `_alpha_cumprod` (cosine, `scaler` warp, clamp to
    [1e-4, 0.9999]) in float32 on the CPU, as its step computes it for a float32 ratio (no device read)."""
    return float(scheduler._alpha_cumprod(torch.tensor([t], dtype=torch.float32), "cpu")[0])


def ratio_noise_level(scheduler, timestep) -> tuple[float, float]:
    """(alpha, sigma) of DDPMWuerstchenScheduler's model input. Its step, at the ratio t it is given (the one the
    pipeline passes the denoiser), reads the model output as epsilon of the sample itself (no input scaling):
    x_t = sqrt(abar(t)) x0 + sqrt(1 - abar(t)) eps. abar is clamped to <= 0.9999, so never 0 or 1."""
    abar = _ratio_alpha_cumprod(scheduler, timestep_value(timestep))
    return math.sqrt(abar), math.sqrt(1.0 - abar)


def _ratio_next_sigma(scheduler, timestep, cache: dict | None) -> float:
    """The VE sigma DDPMWuerstchenScheduler's step moves to: abar at the next entry of its timesteps after the one
    nearest t (its `previous_timestep`); its last step goes to t = 0, abar 0.9999 (sigma 0.01), not to x0."""
    timesteps, t = _floats(scheduler, "timesteps", cache), timestep_value(timestep)
    i = min(range(len(timesteps)), key=lambda k: abs(timesteps[k] - t))
    abar = _ratio_alpha_cumprod(scheduler, timesteps[min(i + 1, len(timesteps) - 1)])
    return ((1.0 - abar) / abar) ** 0.5


def planned_evaluations(scheduler) -> int:
    """Model evaluations the timesteps plan: one per entry, but DDPMWuerstchenScheduler's table ends at the target
    t = 0, which its pipelines never evaluate (they loop over timesteps[:-1])."""
    return len(scheduler.timesteps) - (rule_or_none(scheduler) == "ratio")


def rule_or_none(scheduler) -> str | None:
    """`rule`, or None for a scheduler it refuses."""
    try:
        return rule(scheduler)
    except UnsupportedScheduler:
        return None


def step_parametrization(scheduler, timestep, model_input: torch.Tensor, cache: dict | None = None) -> Parametrization:
    """`scheduler_parametrization`, or for a scheduler it refuses a Parametrization that raises that
    error as soon as a strategy asks for x0 or the noise level (CFG-like rules never do)."""
    try:
        return scheduler_parametrization(scheduler, timestep, model_input, cache)
    except UnsupportedScheduler as e:
        nan = torch.full((model_input.shape[0],) + (1,) * (model_input.ndim - 1), float("nan"), dtype=torch.float64)
        kind = prediction_type(scheduler)
        kind = kind if kind in PREDICTION_TYPES else "sample"
        return Parametrization(kind, model_input, nan, nan, unavailable=str(e))


# --- where an evaluation sits in the solver ----------------------------------------------------------

def evaluations_per_step(scheduler) -> int:
    """Model evaluations per scheduler step: 2 for the predictor-corrector solvers that track their
    stage in `state_in_first_order` (Heun, KDPM2, KDPM2 ancestral, FlowMatch Heun, DPM-Solver SDE),
    else 1 (multistep solvers reuse past evaluations instead of making extra ones)."""
    return 2 if hasattr(type(scheduler), "state_in_first_order") else 1


def starts_step(scheduler) -> bool:
    """Whether the coming evaluation is the first (predictor) evaluation of a scheduler step."""
    # Asked of the class first: a missing attribute on a scheduler goes through ConfigMixin.__getattr__ and an
    # exception, which costs more than the rest of a step's bookkeeping.
    return bool(scheduler.state_in_first_order) if hasattr(type(scheduler), "state_in_first_order") else True


def num_scheduler_steps(scheduler) -> int:
    """Scheduler steps in the planned timesteps: a 2-stage solver's last step has no corrector
    (Heun: 2N - 1 evaluations for N steps)."""
    return math.ceil(planned_evaluations(scheduler) / evaluations_per_step(scheduler))


def _timestep_index(timesteps: list[float], cache: dict | None) -> dict[float, int]:
    """Value -> first index of the timestep table, built once per call (a search per step costs O(steps))."""
    if cache is not None and cache.get("timestep_index", (None,))[0] is timesteps:
        return cache["timestep_index"][1]
    index: dict[float, int] = {}
    for k, v in enumerate(timesteps):
        index.setdefault(v, k)
    if cache is not None:
        cache["timestep_index"] = (timesteps, index)
    return index


def next_sigma(scheduler, timestep, cache: dict | None = None) -> float | None:
    """The VE noise level sigma / alpha the coming scheduler step moves to (0 at the end), or None
    where it cannot be read. Predictor evaluations only (what EluCD's x_t rule needs)."""
    try:
        how = rule(scheduler)
    except UnsupportedScheduler:
        return None
    if how == "preconditioned" or (cache is not None and cache.get("preconditioning") is not None):
        from .preconditioning import table_next_sigma  # it imports this module

        return table_next_sigma(scheduler, timestep, cache)
    if how == "sigmas":
        i = current_sigma_index(scheduler, timestep, cache)
        sigmas = _floats(scheduler, "sigmas", cache)
        if i + 1 >= len(sigmas):
            return 0.0
        s = sigmas[i + 1]
        if prediction_type(scheduler) == "flow" and getattr(scheduler.config, "invert_sigmas", False):
            s = 1.0 - s
        if prediction_type(scheduler) == "flow":
            return s / (1.0 - s) if s < 1.0 else float("inf")
        return s
    if how == "ratio":
        return _ratio_next_sigma(scheduler, timestep, cache)
    timesteps = _floats(scheduler, "timesteps", cache)
    t = timestep_value(timestep)
    i = _timestep_index(timesteps, cache).get(t)  # the timestep is read from this table: an exact match
    if i is None:
        i = min(range(len(timesteps)), key=lambda k: abs(timesteps[k] - t))  # the nearest (first of ties)
    if i + 1 < len(timesteps):
        abar = _floats(scheduler, "alphas_cumprod", cache)[int(timesteps[i + 1])]
    else:  # DDIM/LCM step to their final alphabar (1 with set_alpha_to_one), others to x0
        final = getattr(scheduler, "final_alpha_cumprod", None)
        abar = 1.0 if final is None else float(final)
    return ((1.0 - abar) / max(abar, ZERO_SNR_FLOOR)) ** 0.5


def build_step_context(scheduler, call: dict, model_input: torch.Tensor, timestep) -> StepContext:
    """The StepContext of the coming evaluation, from the hook's per-call state `call` (keys step,
    num_steps, scale, rescale; this function keeps its scheduler-step counter there too)."""
    if call.get("num_steps") is None:
        call["num_steps"] = planned_evaluations(scheduler)
        call["num_scheduler_steps"] = num_scheduler_steps(scheduler)
        call["timesteps"] = scheduler.timesteps
    elif scheduler.timesteps is not call["timesteps"]:  # one identity check per step
        raise ValueError(f"the scheduler's timesteps were replaced during the call (set_timesteps from a step "
                         f"callback?) at evaluation {call['step']}: the step count, windows and schedules of the "
                         "strategy no longer hold; allowed: set the timesteps before the call")
    first = starts_step(scheduler)
    if first or "scheduler_step" not in call:
        call["scheduler_step"] = call.get("scheduler_step", -1) + 1
    t = timestep_value(timestep)  # read once (a device sync where the timestep lives on an accelerator)
    tables = call.setdefault("tables", {})  # the scheduler's tables, read once per call
    param = step_parametrization(scheduler, t, model_input, tables)
    return StepContext(call["step"], call["num_steps"], t, param, call["scale"], call["rescale"],
                       scheduler_step=call["scheduler_step"], num_scheduler_steps=call["num_scheduler_steps"],
                       starts_step=first, next_sigma=next_sigma(scheduler, t, tables) if first else None)
