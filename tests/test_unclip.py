"""UnCLIPScheduler pipelines beyond the zoo's per-class checks: the noise-level rule against the scheduler's own
step, unCLIP's two guided runs (prior, then decoder, each with its own scale), and the Kandinsky combined
pipelines guided stage by stage (apply_guidance on pipe.prior_pipe and pipe.decoder_pipe) inside the combined call."""

import pytest
import torch

import diffusers
from pipeline_zoo import (BATCH, STEPS, _image, _kandinsky, _kandinsky_unet, _mask, _movq, _sd_parts, build,
                          call_kwargs)
import zoo_unclip  # noqa: I001  (after pipeline_zoo, which imports the zoo families itself)
import zoo_unet

from guidance import APG, CFG, Interval
from pipelines import apply_guidance
from pipelines.adapters import REFUSED, adapter_for
from pipelines.parametrization import scheduler_parametrization

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread_per_module")]

APG_AS_CFG = dict(eta=1.0, norm_threshold=0.0, momentum=0.0)  # APG's x0-space rule reduced to CFG


def run(pipe, kwargs) -> torch.Tensor:
    torch.manual_seed(0)
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --- the noise-level rule against UnCLIPScheduler.step --------------------------------------------------------
def _timesteps(steps: int = 5) -> list[tuple[int, int | None]]:
    s = diffusers.UnCLIPScheduler()
    s.set_timesteps(steps)
    t = s.timesteps.tolist()
    return [(t[i], t[i + 1] if i + 1 < len(t) else None) for i in range(len(t))]  # (t, prev_timestep) as pipelines


@pytest.mark.parametrize("t, prev", _timesteps())
def test_epsilon_x0_is_the_steps_pred_original_sample(t, prev):
    """At every timestep, t = 999 included (alphabar 2.4e-9: read unfloored, as the step divides by it)."""
    sched = diffusers.UnCLIPScheduler(clip_sample=False)  # the decoder's epsilon prediction
    x, eps = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    expected = sched.step(eps, t, x, prev_timestep=prev).pred_original_sample
    param = scheduler_parametrization(sched, t, x)
    torch.testing.assert_close(param.to_x0(eps), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(param.from_x0(expected), eps, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("t, prev", _timesteps())
def test_a_sample_prior_steps_as_the_epsilon_model_it_converts_to(t, prev):
    """prediction_type "sample" (the priors): the noise our rule derives from an x0 prediction moves an epsilon
    UnCLIPScheduler to the same next sample (the same noise drawn) as the x0 prediction moves the prior's."""
    prior, eps_sched = (diffusers.UnCLIPScheduler(prediction_type=p, clip_sample=False) for p in ("sample", "epsilon"))
    for s in (prior, eps_sched):  # float64: at t = 999 eps -> x0 divides by alpha = 4.9e-5
        s.alphas_cumprod = s.alphas_cumprod.double()
    x, x0 = torch.randn(2, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64)
    param = scheduler_parametrization(prior, t, x)
    assert param.prediction_type == "sample" and torch.equal(param.to_x0(x0), x0)
    by_x0 = prior.step(x0, t, x, prev_timestep=prev, generator=torch.Generator().manual_seed(1)).prev_sample
    eps = param.to_eps(x0)
    by_eps = eps_sched.step(eps, t, x, prev_timestep=prev, generator=torch.Generator().manual_seed(1)).prev_sample
    torch.testing.assert_close(by_eps, by_x0, rtol=1e-9, atol=1e-9)


# --- unCLIP: the prior's run, then the decoder's, each with its own scale ------------------------------------
def test_unclip_guides_each_stage_with_its_own_scale():
    pipe, kwargs = build("UnCLIPPipeline"), call_kwargs("UnCLIPPipeline")
    assert kwargs["prior_guidance_scale"] != kwargs["decoder_guidance_scale"]
    native = run(pipe, kwargs)
    for changed in ({"prior_guidance_scale": 2.0}, {"decoder_guidance_scale": 2.0}):  # each scale matters here
        assert relative_error(run(pipe, {**kwargs, **changed}), native) > 1e-3
    with apply_guidance(pipe, CFG(scale=2.0)):  # one scale overrides both of the call's
        both = run(pipe, kwargs)
    assert relative_error(both, run(pipe, {**kwargs, "prior_guidance_scale": 2.0,
                                           "decoder_guidance_scale": 2.0})) <= 1e-5
    # CFG runs in both stages when either scale is above 1 (prior at 1: u + 1 (c - u) = c)
    one = {**kwargs, "prior_guidance_scale": 1.0}
    native_one = run(pipe, one)
    with apply_guidance(pipe, CFG()) as handle:
        assert relative_error(run(pipe, one), native_one) <= 1e-5
    assert handle.nfe.tolist() == [4 * STEPS] * BATCH


def test_unclip_stages_are_separate_runs_for_the_strategy():
    """Steps count from 0 in each stage (an interval covers the start of both runs), and per-call state (APG's
    momentum) starts afresh for the decoder: a (B, D) embedding's running average would not fit (B, 3, H, W)."""
    pipe, kwargs = build("UnCLIPPipeline"), call_kwargs("UnCLIPPipeline")
    with apply_guidance(pipe, Interval(CFG(), start=0.0, stop=0.34)) as handle:
        run(pipe, kwargs)
    assert handle.nfe.tolist() == [2 * STEPS + 2] * BATCH  # one unconditional row per stage
    with apply_guidance(pipe, APG(momentum=-0.5, norm_threshold=2.0)) as handle:
        assert torch.isfinite(run(pipe, kwargs)).all()
    assert handle.nfe.tolist() == [4 * STEPS] * BATCH


def test_unclip_refuses_a_call_without_guidance_naming_both_scales():
    pipe, kwargs = build("UnCLIPPipeline"), call_kwargs("UnCLIPPipeline")
    with apply_guidance(pipe, CFG()), pytest.raises(ValueError, match="decoder_guidance_scale > 1"):
        run(pipe, {**kwargs, "prior_guidance_scale": 1.0, "decoder_guidance_scale": 1.0})


# --- the Kandinsky combined pipelines: both stages guided inside the combined call -----------------------------
COMBINED = {  # class -> (decoder UNet input channels, Kandinsky 2.1, image, mask)
    "KandinskyV22CombinedPipeline": (4, False, False, False),
    "KandinskyV22Img2ImgCombinedPipeline": (4, False, True, False),
    "KandinskyV22InpaintCombinedPipeline": (9, False, True, True),
    "KandinskyCombinedPipeline": (4, True, False, False),
    "KandinskyImg2ImgCombinedPipeline": (4, True, True, False),
    "KandinskyInpaintCombinedPipeline": (9, True, True, True),
}


def _combined(name: str):
    channels, v21, _, _ = COMBINED[name]
    prior = zoo_unclip.kandinsky_prior()
    decoder = _kandinsky("KandinskyV22Pipeline")  # its DDIM scheduler and MoVQ
    parts = {f"prior_{k}": v for k, v in prior.components.items()}
    parts.update(unet=_kandinsky_unet(channels), scheduler=decoder.scheduler, movq=_movq())
    if v21:  # the M-CLIP text encoder; a CLIP tokenizer stands in for XLM-R's
        parts.update(unet=zoo_unet._kandinsky21_unet(channels), text_encoder=zoo_unet._mclip(),
                     tokenizer=_sd_parts()["tokenizer"])
    pipe = getattr(diffusers, name)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _combined_kwargs(name: str) -> dict:
    _, _, image, mask = COMBINED[name]
    kw = dict(prompt=zoo_unclip.tp.PROMPTS, guidance_scale=4.0, prior_guidance_scale=3.0, height=32, width=32,
              num_inference_steps=STEPS, prior_num_inference_steps=STEPS, output_type="pt")
    if image:
        kw.update(image=_image(), strength=0.75, num_inference_steps=4)
    if mask:  # inpainting runs every step
        kw.update(mask_image=_mask()[:, 0], num_inference_steps=STEPS)
        kw.pop("strength")
    return kw


@pytest.mark.parametrize("name", sorted(COMBINED))
def test_combined_pipelines_guide_prior_and_decoder_exactly(name):
    pipe, kwargs = _combined(name), _combined_kwargs(name)
    assert "prior_pipe" in REFUSED[name] and "decoder_pipe" in REFUSED[name]
    with pytest.raises(TypeError, match="apply_guidance\\(pipe.prior_pipe"):
        adapter_for(pipe)
    native = run(pipe, kwargs)
    other_prior_scale = run(pipe, {**kwargs, "prior_guidance_scale": 1.5})
    assert relative_error(other_prior_scale, native) > 1e-3  # the prior stage shows in the images
    for make, tolerance in ((CFG, 1e-5), (lambda: APG(**APG_AS_CFG), 1e-3)):
        with apply_guidance(pipe.prior_pipe, make()) as prior, apply_guidance(pipe.decoder_pipe, make()) as decoder:
            guided = run(pipe, kwargs)
        assert relative_error(guided, native) <= tolerance, make
        assert prior.nfe.tolist() == [2 * STEPS] * BATCH and decoder.nfe.tolist() == [2 * STEPS] * BATCH
    with apply_guidance(pipe.prior_pipe, CFG(scale=1.5)):  # a strategy's own scale replaces prior_guidance_scale
        assert relative_error(run(pipe, kwargs), other_prior_scale) <= 1e-5
    assert torch.equal(run(pipe, kwargs), native), "removal must restore bit-identical behaviour"
