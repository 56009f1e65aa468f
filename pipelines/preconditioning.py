"""Denoisers whose raw output F is preconditioned (Karras et al. 2022, EDM): x0 = c_skip x_ve + c_out F.

F is neither eps, v nor a flow velocity of the model input: x0 comes from the unscaled sample
x_ve = x0 + sigma eps and F through coefficients of the step. CFG, and every rule that is linear and
identical per row in the two predictions, commutes with that affine map (the same x_ve and sigma in both
rows), so guiding F gives the pipeline's own CFG exactly. x0-space rules read x0 through the
"preconditioned" `Parametrization`, whose coefficients are computed as the code applying them does at
that step, from its own state:

- the EDM schedulers (EDMEuler, EDM DPM-Solver++, Cosine DPM-Solver++) precondition inside their own
  `scale_model_input` / `step`: sigma = sigmas[step_index], c_in = 1 / sqrt(sigma^2 + sigma_data^2),
  c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = +-sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
  (+ for "epsilon", - for "v_prediction");
- pipelines that precondition themselves name their rule in `Adapter.preconditioning` (`PIPELINE_RULES`); where
  one also replaces x0 on some positions in both branches (Cosmos 2 video-to-world's conditioning frames), out is 0
  there, so x0 is what it sets whatever the output (and from_x0 gives 0 there).
"""

from __future__ import annotations

import math

import torch

from guidance.parametrization import Parametrization

from .parametrization import UnsupportedScheduler, _floats, current_sigma, current_sigma_index, prediction_type, rule


def preconditioned(model_input: torch.Tensor, sigma: float, c_in: float, c_skip: float,
                   c_out: float) -> Parametrization:
    """The "preconditioned" parametrization of a model input c_in x_ve at VE noise level `sigma`.

    Its x is the VP-scaled sample x_ve / sqrt(sigma^2 + 1) (alpha^2 + sigma_vp^2 = 1, as every VP rule assumes:
    v-space rescale, CFG++), which is the model input itself where c_in is that factor (sigma_data = 1)."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    x = model_input
    if alpha != c_in:
        x = model_input.to(torch.promote_types(model_input.dtype, torch.float32)) * (alpha / c_in)
    shape = (model_input.shape[0],) + (1,) * (model_input.ndim - 1)
    full = lambda v: torch.full(shape, v, dtype=torch.float64, device=model_input.device)  # noqa: E731
    return Parametrization("preconditioned", x, full(alpha), full(sigma * alpha), skip=full(c_skip / alpha),
                           out=full(c_out))


def edm_parametrization(scheduler, timestep, model_input: torch.Tensor, cache: dict | None = None) -> Parametrization:
    """The EDM schedulers' own preconditioning (`precondition_inputs` / `precondition_outputs`) at this step."""
    kind = getattr(scheduler.config, "prediction_type", None)
    if kind not in ("epsilon", "v_prediction"):
        raise UnsupportedScheduler(f"scheduler={type(scheduler).__name__}: prediction_type={kind!r} has no EDM output "
                                   "preconditioning (its precondition_outputs raises); allowed: 'epsilon', "
                                   "'v_prediction'")
    s = current_sigma(scheduler, cache, timestep)
    data = float(scheduler.config.sigma_data)
    norm = s * s + data * data
    c_out = s * data / math.sqrt(norm)
    return preconditioned(model_input, s, 1.0 / math.sqrt(norm), data * data / norm,
                          c_out if kind == "epsilon" else -c_out)


def _table_sigma(scheduler, timestep, cache: dict | None, pipeline: str) -> tuple[int, float]:
    """(i, sigmas[i]) at the scheduler's step index: the entry the pipeline's loop reads as `sigmas[i]`."""
    try:
        how = rule(scheduler)
    except UnsupportedScheduler as e:
        raise UnsupportedScheduler(f"{pipeline}: {e}") from None
    if how != "sigmas":
        raise UnsupportedScheduler(f"{pipeline}: scheduler={type(scheduler).__name__} has no sigma table that the "
                                   "pipeline's own preconditioning reads (sigmas[i]); allowed: sigma-table schedulers "
                                   "(Euler, Heun, LMS, DPM-Solver++, UniPC, flow matching, ...)")
    i = current_sigma_index(scheduler, timestep, cache)
    return i, _floats(scheduler, "sigmas", cache)[i]


def latent_upscale_parametrization(scheduler, timestep, model_input: torch.Tensor,
                                   cache: dict | None = None) -> Parametrization:
    """StableDiffusionLatentUpscalePipeline: with s = sigmas[i], it feeds the UNet scale_model_input(x_ve) and hands
    its scheduler 1 / (s^2 + 1) x_ve + scale_model_input(s) F. scale_model_input is the scheduler's own (a factor:
    1 / sqrt(s^2 + 1) on Euler, 1 on DPM-Solver++), asked for that factor as the pipeline asks it. The result is x0
    only where the scheduler takes prediction_type="sample" (the pipeline's own scheduler does)."""
    name = "StableDiffusionLatentUpscalePipeline"
    i, s = _table_sigma(scheduler, timestep, cache, name)
    if prediction_type(scheduler) != "sample":
        raise UnsupportedScheduler(f"{name}: scheduler={type(scheduler).__name__} with prediction_type="
                                   f"{prediction_type(scheduler)!r}: the pipeline hands its scheduler the denoised "
                                   "sample c_skip x + c_out F, which is x0 only for prediction_type='sample'; "
                                   "allowed: 'sample'")
    one = torch.ones((), dtype=torch.float64, device=scheduler.sigmas.device)
    factor = float(scheduler.scale_model_input(one, scheduler.timesteps[i]))  # the step index is already set
    return preconditioned(model_input, s, factor, 1.0 / (s * s + 1.0), s * factor)


def cosmos2_parametrization(scheduler, timestep, model_input: torch.Tensor, cache: dict | None = None,
                            pipeline: str = "Cosmos2TextToImagePipeline") -> Parametrization:
    """Cosmos2TextToImagePipeline: with s = sigmas[i] and t = s / (s + 1), it feeds the transformer (1 - t) x_ve at
    timestep t and guides (1 - t) x_ve - t F (its scheduler then steps the VE velocity (x_ve - x0) / s)."""
    _, s = _table_sigma(scheduler, timestep, cache, pipeline)
    t = s / (s + 1.0)
    return preconditioned(model_input, s, 1.0 - t, 1.0 - t, -t)


def cosmos2_video_parametrization(scheduler, timestep, model_input: torch.Tensor,
                                  cache: dict | None = None) -> Parametrization:
    """Cosmos2VideoToWorldPipeline: Cosmos 2's rule, except on the frames its condition_mask marks (the same in both
    calls), where the input is the conditioning latents and it replaces x0 by them in both branches before its CFG:
    there x0 = the model input whatever F (out = 0; c_skip = c_in makes skip x the model input everywhere). The mask
    is the cond call's, handed over by the layout (pipelines/layouts/conditioned_frames.py)."""
    name = "Cosmos2VideoToWorldPipeline"
    mask = None if cache is None else cache.get("condition_mask")
    if mask is None:
        raise UnsupportedScheduler(f"{name}: no condition_mask was read from its denoiser call, so the frames whose "
                                   "x0 it replaces are unknown; allowed: its own layout, "
                                   "'sequential_conditioned_frames'")
    p = cosmos2_parametrization(scheduler, timestep, model_input, cache, name)
    keep = 1.0 - mask.to(device=p.out.device, dtype=p.out.dtype)  # (B, 1, T, H, W): 0 on the conditioning frames
    return Parametrization("preconditioned", p.x, p.alpha, p.sigma, skip=p.skip, out=p.out * keep)


# Adapter.preconditioning -> the pipeline's own rule: (scheduler, timestep, model input, cache) -> Parametrization.
PIPELINE_RULES = {
    "latent_upscale": latent_upscale_parametrization,
    "cosmos2": cosmos2_parametrization,
    "cosmos2_video": cosmos2_video_parametrization,
}


def table_next_sigma(scheduler, timestep, cache: dict | None = None) -> float:
    """The VE sigma the coming step moves to: sigmas[i + 1] (0 past the end). The EDM schedulers and both
    pipelines above step x_ve along the scheduler's table itself (no flow-time conversion)."""
    i = current_sigma_index(scheduler, timestep, cache)
    sigmas = _floats(scheduler, "sigmas", cache)
    return sigmas[i + 1] if i + 1 < len(sigmas) else 0.0
