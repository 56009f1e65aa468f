"""Our x0 conversion, read from the scheduler's state, equals each scheduler's own x0 estimate."""

import inspect

import pytest
import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    SASolverScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)

from guidance import CFG, APG
from guidance.base import StepContext
from pipelines import scheduler_parametrization
from pipelines.parametrization import UnsupportedScheduler, step_parametrization

STEPPED = [DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler,
           KDPM2DiscreteScheduler, KDPM2AncestralDiscreteScheduler, LMSDiscreteScheduler, CogVideoXDDIMScheduler]
MULTISTEP = [DPMSolverMultistepScheduler, UniPCMultistepScheduler, DPMSolverSinglestepScheduler, SASolverScheduler]


def step(scheduler, output, t, sample, seed=1):
    accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    kwargs = {"generator": torch.Generator().manual_seed(seed)} if accepts_generator else {}
    return scheduler.step(output, t, sample, **kwargs)


def trajectory(scheduler, steps=6):
    """Yield (t, sample, model_input, model_output) along a run, stepping with random outputs."""
    g = torch.Generator().manual_seed(0)
    scheduler.set_timesteps(steps)
    sample = torch.randn(2, 4, 8, 8, generator=g) * getattr(scheduler, "init_noise_sigma", 1.0)
    for i, t in enumerate(scheduler.timesteps):
        scale = getattr(scheduler, "scale_model_input", None)
        model_input = scale(sample, t) if scale is not None else sample
        output = torch.randn(2, 4, 8, 8, generator=g)
        yield t, sample, model_input, output
        sample = step(scheduler, output, t, sample, seed=i).prev_sample


def copy_state(probe, sched):
    probe.__dict__.update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in sched.__dict__.items()})
    return probe


@pytest.mark.parametrize("cls", STEPPED)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_matches_pred_original_sample(cls, prediction_type):
    kwargs = {"clip_sample": False} if cls in (DDIMScheduler, DDPMScheduler, CogVideoXDDIMScheduler) else {}
    sched = cls(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction_type, **kwargs)
    probe = cls.from_config(sched.config)
    checked = 0
    for t, sample, model_input, output in trajectory(sched):
        ours = scheduler_parametrization(sched, t, model_input).to_x0(output)
        # Step a copy in the same state to read the scheduler's own x0 (second-order stages included).
        theirs = step(copy_state(probe, sched), output, t, sample).pred_original_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked == len(sched.timesteps) >= 6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_lcm_and_tcd_outputs_follow_from_our_x0(prediction_type):
    """LCM reports c_out x0 + c_skip x_t, TCD sqrt(abar_s) x0 + sqrt(1 - abar_s) eps: rebuilt from ours."""
    for cls in (LCMScheduler, TCDScheduler):
        sched = cls(prediction_type=prediction_type)
        probe = cls.from_config(sched.config)
        for t, sample, model_input, output in trajectory(sched):
            param = scheduler_parametrization(sched, t, model_input)
            copy_state(probe, sched)
            if probe.step_index is None:
                probe._init_step_index(t)
            if cls is LCMScheduler:
                c_skip, c_out = probe.get_scalings_for_boundary_condition_discrete(t)
                expected = c_out * param.to_x0(output) + c_skip * sample
                got = step(probe, output, t, sample).denoised
            else:
                i = probe.step_index
                t_prev = probe.timesteps[i + 1] if i + 1 < len(probe.timesteps) else torch.tensor(0)
                abar_s = probe.alphas_cumprod[torch.floor((1 - 0.3) * t_prev).long()]
                expected = abar_s.sqrt() * param.to_x0(output) + (1 - abar_s).sqrt() * param.to_eps(output)
                got = probe.step(output, t, sample, eta=0.3, generator=torch.Generator().manual_seed(0)).pred_noised_sample
            torch.testing.assert_close(expected.float(), got, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", MULTISTEP)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("karras", [False, True])
def test_x0_matches_multistep_convert_model_output(cls, prediction_type, karras):
    sched = cls(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction_type,
                use_karras_sigmas=karras)
    for t, sample, model_input, output in trajectory(sched):
        if sched.step_index is None:
            sched._init_step_index(t)
        ours = scheduler_parametrization(sched, t, model_input).to_x0(output)
        theirs = sched.convert_model_output(output, sample=sample)  # x0 for dpmsolver++ / UniPC bh2 / SA data
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_deis_noise_estimate_matches_convert_model_output(prediction_type):
    sched = DEISMultistepScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    for t, sample, model_input, output in trajectory(sched):
        if sched.step_index is None:
            sched._init_step_index(t)
        ours = scheduler_parametrization(sched, t, model_input).to_eps(output)
        torch.testing.assert_close(ours, sched.convert_model_output(output, sample=sample), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_flow_sigmas_variants_match_convert_model_output(cls):
    sched = cls(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    for t, sample, model_input, output in trajectory(sched):
        if sched.step_index is None:
            sched._init_step_index(t)
        param = scheduler_parametrization(sched, t, model_input)
        assert param.prediction_type == "flow"
        torch.testing.assert_close(param.to_x0(output), sched.convert_model_output(output, sample=sample),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler])
def test_flow_matching_noise_level_is_the_models_timestep(cls):
    """Flow matching feeds the model t = s * num_train_timesteps: every evaluation (Heun's second
    stage included) must read the s that goes with its timestep."""
    sched = cls(shift=3.0)
    for t, sample, model_input, output in trajectory(sched):
        s = scheduler_parametrization(sched, t, model_input).noise_level
        torch.testing.assert_close(s * 1000, torch.full_like(s, float(t)), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_zero_terminal_snr_is_finite_and_exact(cls, prediction_type):
    extra = {"clip_sample": False} if cls is not EulerDiscreteScheduler else {}
    sched = cls(beta_schedule="scaled_linear", prediction_type=prediction_type, rescale_betas_zero_snr=True,
                timestep_spacing="trailing", **extra)
    sched.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(sched.timesteps):
        # A fresh sample per step: diffusers' own DDIM/DDPM step turns it into inf at alphabar = 0.
        scale = (sched.sigmas[i] ** 2 + 1).sqrt() if cls is EulerDiscreteScheduler else 1.0  # VE-scaled latents
        sample = torch.randn(2, 4, 8, 8, generator=g) * scale
        model_input, output = sched.scale_model_input(sample, t), torch.randn(2, 4, 8, 8, generator=g)
        param = scheduler_parametrization(sched, t, model_input)
        x0 = param.to_x0(output)
        assert torch.isfinite(x0).all(), (i, t)
        torch.testing.assert_close(param.from_x0(x0), output, rtol=1e-4, atol=1e-4)
        ctx = StepContext(i, len(sched.timesteps), float(t), param, 5.0)
        preds = {"cond": output, "uncond": output.flip(0)}
        apg = APG(eta=1.0, norm_threshold=0.0, momentum=0.0).combine(ctx, preds)  # CFG in x0 space
        torch.testing.assert_close(apg, CFG().combine(ctx, preds), rtol=1e-4, atol=1e-3)
        theirs = step(sched, output, t, sample).pred_original_sample
        if torch.isfinite(theirs).all():  # diffusers' DDIM/DDPM divide by zero at alphabar = 0 with eps
            torch.testing.assert_close(x0, theirs, rtol=1e-4, atol=1e-4)
        else:
            assert prediction_type == "epsilon" and i == 0 and cls is not EulerDiscreteScheduler


def test_flow_matching_x0_reproduces_the_euler_step():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    for t, sample, model_input, output in trajectory(sched):
        index = sched.step_index if sched.step_index is not None else 0
        x0 = scheduler_parametrization(sched, t, model_input).to_x0(output)
        sigma_next = sched.sigmas[index + 1]
        # x_next = (1 - s') x0 + s' eps with eps = x0 + v: the Euler step must land exactly there.
        expected_next = x0 + sigma_next * output
        probe = FlowMatchEulerDiscreteScheduler.from_config(sched.config)
        probe.__dict__.update(sched.__dict__)
        probe._step_index = index
        got = probe.step(output, t, sample).prev_sample
        torch.testing.assert_close(got, expected_next, rtol=1e-5, atol=1e-5)


def test_unknown_schedulers_are_refused_clearly():
    from diffusers import IPNDMScheduler

    sched = IPNDMScheduler()
    sched.set_timesteps(4)
    with pytest.raises(UnsupportedScheduler, match="scheduler=IPNDMScheduler: its noise level .* unknown"):
        scheduler_parametrization(sched, sched.timesteps[0], torch.zeros(1, 3, 4, 4))

    class HomeMade:  # has a sigma table, but nothing says how the model sees it: refused, not guessed
        sigmas = torch.linspace(10, 0, 5)
        step_index = 0
        config = type("Config", (), {"prediction_type": "epsilon"})()

    with pytest.raises(UnsupportedScheduler, match="scheduler=HomeMade: its noise level .* unknown.*allowed: DDIM"):
        scheduler_parametrization(HomeMade(), 999, torch.zeros(1, 3, 4, 4))

    class MyEuler(EulerDiscreteScheduler):  # a subclass keeps its parent's rule
        pass

    sub = MyEuler()
    sub.set_timesteps(4)
    assert torch.isfinite(scheduler_parametrization(sub, sub.timesteps[0], torch.zeros(1, 3, 4, 4)).alpha).all()


def test_an_unsupported_scheduler_still_runs_cfg_and_refuses_x0_at_use():
    from diffusers import IPNDMScheduler

    sched = IPNDMScheduler()
    sched.set_timesteps(4)
    param = step_parametrization(sched, sched.timesteps[0], torch.zeros(2, 3, 4, 4))
    ctx = StepContext(0, 4, 0.0, param, 3.0)
    preds = {"cond": torch.ones(2, 3, 4, 4), "uncond": torch.zeros(2, 3, 4, 4)}
    torch.testing.assert_close(CFG().combine(ctx, preds), 3.0 * torch.ones(2, 3, 4, 4))
    with pytest.raises(ValueError, match="IPNDMScheduler: its noise level .* unknown"):
        APG().combine(ctx, preds)


@pytest.mark.parametrize("cls", [FlowMatchEulerDiscreteScheduler, EulerDiscreteScheduler])
def test_a_schedule_entered_part_way_reads_the_sigma_of_its_first_step(cls):
    """img2img pipelines that start at timesteps[k] without set_begin_index (Wan video-to-video): before the first
    step the scheduler has no step index; its own step picks index k from the timestep, and so must we where the
    adapter row says so (first_step_from_timestep)."""
    sched = cls()
    sched.set_timesteps(8)
    k = 3
    t = sched.timesteps[k]
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert sched.step_index is None and sched.begin_index is None
    first = scheduler_parametrization(sched, t, sample).noise_level.flatten()[0].item()
    assert first == pytest.approx(sched.sigmas[0].item(), rel=1e-6)  # by default: index 0 (timestep units vary)
    level = scheduler_parametrization(sched, t, sample, {"first_step_from_timestep": True}).noise_level
    level = level.flatten()[0].item()
    sched.step(torch.zeros_like(sample), t, sample)  # the scheduler's own choice of index
    sigma = sched.sigmas[sched.step_index - 1].item()
    assert sched.step_index - 1 == k and level == pytest.approx(sigma, rel=1e-6)  # the table's s (flow or VE)


def test_inverted_flow_sigmas_read_the_noise_level_and_reproduce_the_step():
    """Mochi: FlowMatch Euler with invert_sigmas holds the data fraction 1 - s and its model predicts x0 - eps (the
    negated velocity, `negated_output` in its adapter row): x0 = x - s v with v = -output reproduces its step."""
    sched = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    for t, sample, model_input, output in trajectory(sched, steps=5):
        param = scheduler_parametrization(sched, t, model_input)
        i = sched.step_index or 0
        s = 1.0 - float(sched.sigmas[i])
        torch.testing.assert_close(param.noise_level.flatten(), torch.full((2,), s, dtype=torch.float64))
        x0 = param.to_x0(-output.double())
        s_next = 1.0 - float(sched.sigmas[i + 1])
        eps = (model_input.double() - (1 - s) * x0) / s
        expected = (1 - s_next) * x0 + s_next * eps  # the flow at the next noise level
        stepped = copy_state(FlowMatchEulerDiscreteScheduler(invert_sigmas=True), sched).step(output, t, sample).prev_sample
        torch.testing.assert_close(stepped.double(), expected, rtol=1e-5, atol=1e-5)
