"""Preconditioned denoiser outputs (x0 = c_skip x + c_out F, pipelines/preconditioning.py).

APG(eta=1, r=0, beta=0) equals CFG through any pair of mutually inverse conversions, so the zoo's exactness test
cannot see a wrong c_skip or c_out. Here the x0 the hook reads is compared with the x0 the code that applies the
preconditioning computes itself: the EDM schedulers' `precondition_outputs`, and on the pipelines, the denoised
sample each one steps its scheduler with."""

import functools

import pytest
import torch

import diffusers
from pipeline_zoo import build, call_kwargs
from x0_spy import x0_read_and_stepped

from guidance import APG, CFG
from pipelines import apply_guidance
from pipelines.adapters import Adapter
from pipelines.parametrization import scheduler_parametrization

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread_per_module")]

EDM = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "CosineDPMSolverMultistepScheduler")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", EDM)
def test_edm_schedulers_x0_is_their_own_precondition_outputs(name, kind, sigma_data):
    if name == "CosineDPMSolverMultistepScheduler":  # diffusers gives a stand-in without torchsde
        pytest.importorskip("torchsde", reason="CosineDPMSolverMultistepScheduler needs torchsde")
    sched = getattr(diffusers, name)(sigma_data=sigma_data, prediction_type=kind)
    sched.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    x_ve = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * 3
    out = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    for i in (0, 3, 5):
        sched._step_index = i
        sigma = sched.sigmas[i].double()
        model_input = sched.precondition_inputs(x_ve, sigma)
        param = scheduler_parametrization(sched, sched.timesteps[i], model_input)
        expected = sched.precondition_outputs(x_ve, out, sigma)
        assert relative_error(param.to_x0(out), expected) <= 1e-12
        assert relative_error(param.from_x0(expected), out) <= 1e-10
        assert param.noise_level.tolist() == pytest.approx([float(sigma)] * 2, rel=1e-12)
        torch.testing.assert_close(param.alpha**2 + param.sigma**2, torch.ones_like(param.alpha))  # VP


CASES = ("StableAudioPipeline", "StableDiffusionLatentUpscalePipeline", "Cosmos2TextToImagePipeline")


def _x0_stepped(name: str, scheduler, output: torch.Tensor, sample: torch.Tensor, index: int) -> torch.Tensor:
    """The x0 a scheduler step uses, from what the pipeline hands it (called after the step: `index` = its index)."""
    sigma = scheduler.sigmas[index]
    if name == "StableAudioPipeline":  # the raw output: the EDM scheduler preconditions it itself
        return scheduler.precondition_outputs(sample, output, sigma)
    if name == "StableDiffusionLatentUpscalePipeline":  # c_skip x + c_out F, a prediction_type="sample"
        return output
    return sample - sigma * output  # Cosmos 2: the velocity (x - x0) / sigma


@functools.cache
def _second(name: str):
    """The case's second scheduler (the zoo's second-scheduler test runs the same), or None."""
    scheduler = build(name).scheduler
    if name == "StableAudioPipeline":
        return diffusers.EDMEulerScheduler.from_config(scheduler.config)
    if name == "StableDiffusionLatentUpscalePipeline":
        return diffusers.DPMSolverMultistepScheduler.from_config(scheduler.config)
    return None


@pytest.mark.parametrize("second", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_the_x0_read_is_the_one_the_pipeline_steps_with(name, second):
    pipe, kwargs = build(name), call_kwargs(name)
    if second:
        if _second(name) is None:
            pytest.skip(f"{name}: its pipeline takes no other scheduler (sigmas= in set_timesteps)")
        pipe.scheduler = _second(name)
    scheduler = pipe.scheduler
    read, stepped, _ = x0_read_and_stepped(pipe, kwargs, lambda out, x, i: _x0_stepped(name, scheduler, out, x, i))
    assert len(read) == len(stepped) >= 2
    errors = [relative_error(r, s) for r, s in zip(read, stepped)]
    assert max(errors) <= 1e-5, errors


def test_latent_upscaler_with_a_non_sample_scheduler_refuses_x0_but_runs_cfg():
    """The pipeline hands its scheduler c_skip x + c_out F, which is x0 only for prediction_type="sample"."""
    name = "StableDiffusionLatentUpscalePipeline"
    pipe, kwargs = build(name), call_kwargs(name)
    pipe.scheduler = diffusers.EulerDiscreteScheduler(prediction_type="epsilon")
    native = pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]
    with apply_guidance(pipe, CFG()):
        assert relative_error(pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0], native) <= 1e-5
    with apply_guidance(pipe, APG(eta=1.0, norm_threshold=0.0, momentum=0.0)), \
            pytest.raises(ValueError, match=r"StableDiffusionLatentUpscalePipeline: scheduler=EulerDiscreteScheduler "
                                            r"with prediction_type='epsilon'.*allowed: 'sample'"):
        pipe(**kwargs)


def test_an_unknown_preconditioning_rule_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"preconditioning='edm'.*allowed: None, 'latent_upscale', 'cosmos2'"):
        Adapter("unet", "uncond_cond", "guidance_scale", "hint", preconditioning="edm")


@pytest.mark.parametrize("name", ["StableDiffusionLatentUpscalePipeline", "Cosmos2TextToImagePipeline"])
def test_dynamic_cfg_is_refused_where_the_pipeline_steps_a_transform_of_the_output(name):
    """DynamicCFG steps scheduler copies with the guided output; these pipelines step theirs with c_skip x + c_out F."""
    from guidance import DynamicCFG

    pipe = build(name)
    with apply_guidance(pipe, DynamicCFG()), pytest.raises(ValueError, match=f"DynamicCFG: {name} hands its "
                                                                              "scheduler a transform"):
        pipe(**call_kwargs(name))
