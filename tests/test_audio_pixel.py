"""LongCat-AudioDiT (inverted sigmas, negated output, cond then uncond calls) and PRX Pixel (x0 output stepped as the
velocity (x - x0) / max(t, 0.05)): the x0 the hook reads is the one the pipeline steps with.

APG(eta=1, r=0, beta=0) equals CFG through any pair of mutually inverse conversions, so the zoo's exactness test
cannot see a wrong x0. Here the x0 of the guided prediction, as strategies read it, is compared with the x0 implied
by what the pipeline hands its scheduler: x = s_data x0 + (1 - s_data) eps stepped with x0 - eps (LongCat), and
x0 = x - sigma v (PRX Pixel, including its last step, where t < 0.05 makes that x0 a blend of x and the output)."""

import functools

import pytest
import torch

import diffusers
from pipeline_zoo import build, call_kwargs
from x0_spy import x0_read_and_stepped

from guidance import CFG, DynamicCFG
from pipelines import apply_guidance
from pipelines.adapters import Adapter

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread_per_module")]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _x0_stepped(name: str, scheduler, output: torch.Tensor, sample: torch.Tensor, index: int) -> torch.Tensor:
    """The x0 of a scheduler step, from what the pipeline hands it (called after the step: `index` = its index)."""
    sigma = scheduler.sigmas[index]
    if name == "LongCatAudioDiTPipeline":  # the table holds the data fraction; the output is x0 - eps
        return sample + (1 - sigma) * output
    return sample - sigma * output  # PRX Pixel: the flow velocity (x - x0) / sigma


@functools.cache
def _heun(name: str):
    return diffusers.FlowMatchHeunDiscreteScheduler.from_config(build(name).scheduler.config)


@pytest.mark.parametrize("name, second", [("LongCatAudioDiTPipeline", False), ("PRXPixelPipeline", False),
                                          ("PRXPixelPipeline", True)])  # LongCat sets sigmas=, which Heun refuses
def test_the_x0_read_is_the_one_the_pipeline_steps_with(name, second):
    pipe, kwargs = build(name), call_kwargs(name)
    if second:
        pipe.scheduler = _heun(name)
    scheduler = pipe.scheduler
    read, stepped, outputs = x0_read_and_stepped(pipe, kwargs, lambda out, x, i: _x0_stepped(name, scheduler, out, x, i))
    assert len(read) == len(stepped) >= 3
    errors = [relative_error(r, s) for r, s in zip(read, stepped)]
    assert max(errors) <= 1e-5, errors
    if name == "PRXPixelPipeline":  # the model output F = x - t_x v: x0 itself where t >= 0.05, a blend below
        t_x = [max(t / 1000, 0.05) for _, _, t in outputs]
        raw = [x - tx * v for (v, x, _), tx in zip(outputs, t_x)]
        assert outputs[-1][2] / 1000 < 0.05  # the clamp is exercised
        for r, f, (_, _, t) in zip(read, raw, outputs):
            assert (relative_error(r, f) <= 1e-5) == (t / 1000 >= 0.05), (t, relative_error(r, f))


@pytest.mark.parametrize("name", ["LongCatAudioDiTPipeline", "PRXPixelPipeline", "MochiPipeline"])
def test_dynamic_cfg_is_refused_where_the_scheduler_steps_another_output_than_the_strategys(name):
    """DynamicCFG steps scheduler copies with the guided output as strategies see it: PRX Pixel's scheduler steps the
    velocity made from it, Mochi's and LongCat's the raw output whose negation strategies see."""
    pipe = build(name)
    with apply_guidance(pipe, DynamicCFG()), pytest.raises(ValueError, match=f"DynamicCFG: {name} hands its "
                                                                              "scheduler a transform"):
        pipe(**call_kwargs(name))


@pytest.mark.parametrize("floor", [0.0, -0.05, float("nan")])
def test_a_non_positive_x0_velocity_floor_is_refused(floor):
    with pytest.raises(ValueError, match=r"x0_velocity_floor=.*allowed: None or a positive number"):
        Adapter("transformer", "uncond_cond", "guidance_scale", "hint", x0_velocity_floor=floor)
