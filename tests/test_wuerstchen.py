"""Würstchen and Stable Cascade beyond the zoo's per-class tests: the noise-level rule of DDPMWuerstchenScheduler
against the scheduler's own noising, each stage of the combined pipelines guided inside the combined call, and a
scheduler Würstchen cannot step refused (the classes' own rows: tests/test_pipeline_zoo.py, zoo_wuerstchen.py)."""

import pytest
import torch

import diffusers
from pipeline_zoo import STEPS  # first: it imports zoo_wuerstchen itself

import zoo_wuerstchen as zw

from guidance import APG, CFG
from pipelines import apply_guidance
from pipelines.parametrization import next_sigma, planned_evaluations, scheduler_parametrization

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread_per_module")]

APG_AS_CFG = dict(eta=1.0, norm_threshold=0.0, momentum=0.0)


def run(pipe, kwargs) -> torch.Tensor:
    torch.manual_seed(0)
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("scaler", [1.0, 2.0, 0.5])
def test_the_ratio_rule_is_the_schedulers_own_noising(scaler):
    """x_t = alpha x0 + sigma eps with (alpha, sigma) read at the ratio t equals the scheduler's add_noise at t (its
    cosine, scaler warp and clamp); the next noise level is the one at the next ratio; the table's last entry (t = 0)
    is no evaluation."""
    scheduler = diffusers.DDPMWuerstchenScheduler(scaler=scaler)
    scheduler.set_timesteps(4)
    assert planned_evaluations(scheduler) == 4
    x0, eps = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)).unbind(0)
    ratios = scheduler.timesteps.tolist()
    for i, t in enumerate(ratios[:-1]):
        noisy = scheduler.add_noise(x0[None], eps[None], torch.tensor([t]))[0]
        param = scheduler_parametrization(scheduler, t, noisy[None])
        mixed = param.alpha.flatten()[0] * x0.double() + param.sigma.flatten()[0] * eps.double()
        assert relative_error(mixed.float(), noisy) <= 1e-6, (t, scaler)
        abar = float(scheduler._alpha_cumprod(torch.tensor([ratios[i + 1]]), "cpu")[0])
        assert next_sigma(scheduler, t) == pytest.approx(((1 - abar) / abar) ** 0.5, rel=1e-6)


@pytest.mark.parametrize("name", ["WuerstchenCombinedPipeline", "StableCascadeCombinedPipeline"])
def test_each_stage_of_a_combined_pipeline_is_guided_exactly_in_the_combined_call(name):
    """The combined class is refused with a pointer to its stages; guided there, each with its own strategy, the
    combined call equals the native one (CFG; APG(eta=1, r=0, beta=0)), each stage counts its own rows, a stage's own
    scale is its strategy's to set, and removal gives the native output back bit for bit."""
    pipe = (zw.wuerstchen if name.startswith("Wuerstchen") else zw.cascade)(name)
    kwargs = zw.combined_kwargs()
    with pytest.raises(TypeError, match=r"apply_guidance\(pipe.prior_pipe, ...\) and apply_guidance\(pipe.decoder_pipe"):
        apply_guidance(pipe, CFG())
    native = run(pipe, kwargs)
    with apply_guidance(pipe.prior_pipe, CFG()) as prior, apply_guidance(pipe.decoder_pipe, CFG()) as decoder:
        assert relative_error(run(pipe, kwargs), native) <= 1e-5
    assert prior.nfe.tolist() == decoder.nfe.tolist() == [2 * STEPS] * 2
    with apply_guidance(pipe.prior_pipe, APG(**APG_AS_CFG)), apply_guidance(pipe.decoder_pipe, APG(**APG_AS_CFG)):
        assert relative_error(run(pipe, kwargs), native) <= 1e-3
    with apply_guidance(pipe.decoder_pipe, CFG(scale=2.0)):  # the decoder stage alone, at its strategy's scale
        assert relative_error(run(pipe, kwargs), run(pipe, {**kwargs, "decoder_guidance_scale": 2.0})) <= 1e-5
    assert torch.equal(run(pipe, kwargs), native), "removal must restore bit-identical behaviour"


@pytest.mark.parametrize("name", ["WuerstchenPriorPipeline", "WuerstchenDecoderPipeline"])
def test_wuerstchen_refuses_a_scheduler_that_is_not_stepped_with_its_ratio(name):
    """Würstchen steps any scheduler with the ratio it passes its denoiser; a DDPM scheduler's noise level would
    then be read at a wrong timestep, so the guided call stops at its first step, naming the scheduler."""
    pipe = zw.wuerstchen(name, diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    kwargs = zw.CASES[name][1]()
    with apply_guidance(pipe, CFG()), pytest.raises(ValueError, match=rf"{name} steps its scheduler with the timestep "
                                                                      r"ratio .* scheduler=DDPMScheduler .* allowed: "
                                                                      r"DDPMWuerstchenScheduler"):
        run(pipe, kwargs)


def test_an_unknown_timestep_ratio_mode_is_refused_naming_it():
    from pipelines.adapters import Adapter

    with pytest.raises(ValueError, match=r"timestep_ratio='ratio' is unknown; allowed: None, 'stepped', 'converted'"):
        Adapter("prior", "cond_uncond", "guidance_scale", "", timestep_ratio="ratio")
