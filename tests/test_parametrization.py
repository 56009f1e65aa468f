"""Our x0 conversion, read from the scheduler's state, equals each scheduler's own x0 estimate."""

import inspect

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from pipelines import scheduler_parametrization

STEPPED = [DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, HeunDiscreteScheduler]
MULTISTEP = [DPMSolverMultistepScheduler, UniPCMultistepScheduler]


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


@pytest.mark.parametrize("cls", STEPPED)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_matches_pred_original_sample(cls, prediction_type):
    kwargs = {"clip_sample": False} if cls in (DDIMScheduler, DDPMScheduler) else {}  # compare before clipping
    sched = cls(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=prediction_type, **kwargs)
    probe = cls.from_config(sched.config)
    checked = 0
    for t, sample, model_input, output in trajectory(sched):
        ours = scheduler_parametrization(sched, t, model_input).to_x0(output)
        # Step a copy in the same state to read the scheduler's own x0.
        probe.__dict__.update({k: (v.clone() if torch.is_tensor(v) else v) for k, v in sched.__dict__.items()})
        theirs = getattr(step(probe, output, t, sample), "pred_original_sample", None)
        if theirs is None:
            continue  # Heun reports x0 only on its first-order evaluations
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked >= 3


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
        theirs = sched.convert_model_output(output, sample=sample)  # x0 for dpmsolver++ / UniPC bh2
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


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


def test_edm_preconditioned_scheduler_is_refused_clearly():
    from diffusers import EDMEulerScheduler

    sched = EDMEulerScheduler()
    sched.set_timesteps(4)
    with pytest.raises(NotImplementedError, match="EDMEulerScheduler"):
        scheduler_parametrization(sched, sched.timesteps[0], torch.zeros(1, 3, 4, 4))
