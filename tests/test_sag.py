"""SAG as a perturbed branch built from the step's own pass: through the hook on the plain StableDiffusionPipeline
equal to diffusers' StableDiffusionSAGPipeline on the same components, counted apart, composable, and refused
where it cannot be made."""

import functools

import pytest
import torch

import diffusers
import tiny_pipelines as tp
from pipeline_zoo import build, call_kwargs

from guidance import APG, CFG, SAG, Interval, Perturbation, from_config
from pipelines import StrategyGuider, apply_guidance

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread_per_module")]

SD = "StableDiffusionPipeline"
STEPS = 3  # the zoo's call


def run(pipe, kwargs) -> torch.Tensor:
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@functools.cache
def pipelines() -> tuple:
    """Our tiny plain SD pipeline and diffusers' SAG class on its very components (built once)."""
    base = build(SD)
    cls = diffusers.StableDiffusionSAGPipeline
    sag = cls(**{k: v for k, v in base.components.items() if k in cls.__init__.__code__.co_varnames})
    sag.set_progress_bar_config(disable=True)
    return base, sag


def with_scheduler(name: str | None, prediction_type: str = "epsilon") -> tuple:
    """The two pipelines with fresh schedulers of class `name` (None: the zoo's DDIM) from one config."""
    base, sag = pipelines()
    config = {**build(SD).scheduler.config, "prediction_type": prediction_type}
    cls = getattr(diffusers, name) if name else diffusers.DDIMScheduler
    base.scheduler, sag.scheduler = cls.from_config(config), cls.from_config(config)
    return base, sag


CASES = [(None, "epsilon", 7.5), (None, "epsilon", 1.0), ("DPMSolverMultistepScheduler", "epsilon", 7.5),
         (None, "v_prediction", 7.5)]


@pytest.mark.parametrize("scheduler, prediction_type, guidance_scale", CASES, ids=str)
def test_sag_equals_diffusers_sag_pipeline(scheduler, prediction_type, guidance_scale):
    """Measured: DDIM CFG on 1.1e-6, CFG off 4.5e-7, DPM-Solver++ 7.2e-7, DDIM v-prediction 2.6e-6 (the map's
    module runs SDPA in our pipeline and diffusers' bmm store processor in theirs: the only difference)."""
    base, sag = with_scheduler(scheduler, prediction_type)
    kwargs = call_kwargs(SD)
    assert kwargs["guidance_scale"] > 1
    native = run(sag, {**kwargs, "guidance_scale": guidance_scale, "sag_scale": 0.75})
    assert rel(native, run(sag, {**kwargs, "guidance_scale": guidance_scale, "sag_scale": 0.0})) > 1e-2
    cfg_on = guidance_scale > 1
    plain = run(base, kwargs)
    with apply_guidance(base, SAG(scale=None if cfg_on else 1.0, sag_scale=0.75)) as handle:
        ours = run(base, kwargs)  # the call runs CFG; SAG(scale=1) asks for no unconditional rows
    assert rel(ours, native) <= 1e-5
    assert handle.nfe.tolist() == [(2 if cfg_on else 1) * STEPS] * 2
    assert handle.perturbed_nfe.tolist() == [STEPS] * 2 and handle.perturbed_nfe_per_sample == STEPS
    assert torch.equal(run(base, kwargs), plain), "removal leaves nothing behind"
    block = base.unet.mid_block.attentions[0]
    assert not block._forward_hooks and not block.transformer_blocks[0].attn1._forward_hooks, "hooks: the call only"


def test_the_sag_class_guided_by_our_sag_equals_its_own_sag():
    """StableDiffusionSAGPipeline's adapter row runs it at sag_scale=0; our SAG through it gives back its own
    sag_scale=0.75 (measured 7.6e-7, the zoo's case: latents out)."""
    name = "StableDiffusionSAGPipeline"
    pipe, kwargs = build(name), call_kwargs(name)
    assert kwargs["sag_scale"] == 0.0
    native = run(pipe, {**kwargs, "sag_scale": 0.75})
    with apply_guidance(pipe, SAG(sag_scale=0.75)) as handle:
        ours = run(pipe, kwargs)
    assert rel(ours, native) <= 1e-5 and handle.perturbed_nfe.tolist() == [STEPS] * 2


def test_sag_scale_zero_is_cfg_without_degraded_calls():
    base, sag = with_scheduler(None)
    kwargs = call_kwargs(SD)
    plain = run(base, kwargs)
    with apply_guidance(base, SAG(sag_scale=0.0)) as handle:
        ours = run(base, kwargs)
    assert torch.equal(ours, plain)  # the pipeline's own CFG, bit for bit
    assert rel(ours, run(sag, {**kwargs, "sag_scale": 0.0})) <= 1e-5  # SAG's class runs its map's module with bmm
    assert handle.perturbed_nfe.tolist() == [0, 0]


def test_sag_batch_rows_equal_each_sample_alone():
    base, _ = with_scheduler(None)
    kwargs = call_kwargs(SD)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with apply_guidance(base, SAG(sag_scale=1.0)):
        both = run(base, {**kwargs, "latents": latents})
        for i in range(2):
            alone = run(base, {**kwargs, "prompt": kwargs["prompt"][i:i + 1], "latents": latents[i:i + 1]})
            assert rel(both[i:i + 1], alone) <= 1e-5


def test_sag_in_an_interval_and_over_another_rule():
    base, _ = with_scheduler(None)
    kwargs = call_kwargs(SD)
    with apply_guidance(base, Interval(SAG(), start=0.0, stop=0.34)) as handle:  # step 0 of 3
        run(base, kwargs)
    assert handle.perturbed_nfe.tolist() == [1, 1] and handle.nfe.tolist() == [4, 4]
    with apply_guidance(base, APG(eta=0.0)):
        apg = run(base, kwargs)
    with apply_guidance(base, SAG(sag_scale=1.0, inner=APG(eta=0.0))) as handle:
        both = run(base, kwargs)
    assert torch.isfinite(both).all() and rel(both, apg) > 1e-3
    assert handle.perturbed_nfe.tolist() == [STEPS] * 2


def test_sag_inner_cfg_equals_sag_with_its_scale():
    base, _ = with_scheduler(None)
    kwargs = call_kwargs(SD)
    with apply_guidance(base, SAG(scale=4.0)):
        plain = run(base, kwargs)
    with apply_guidance(base, SAG(inner=CFG(scale=4.0))):
        assert rel(run(base, kwargs), plain) <= 1e-6


def test_sag_runs_in_bf16():
    pipe = tp.build("sd").to(torch.bfloat16)  # its own components: the zoo's are shared in float32
    kwargs = tp.call_kwargs("sd")
    with apply_guidance(pipe, SAG()) as handle:
        image = run(pipe, kwargs)
    assert image.dtype == torch.bfloat16 and torch.isfinite(image.float()).all()
    assert handle.perturbed_nfe.tolist() == [STEPS] * 2


def test_sag_config_round_trip_and_bad_knobs():
    rule = SAG(scale=5.0, sag_scale=0.5, blur_sigma=2.0)
    again = from_config(rule.to_config())
    assert again.to_config() == rule.to_config()
    module = "mid_block.attentions.0.transformer_blocks.0.attn1"
    assert again.perturbation == Perturbation("self_attention_blur", (module,), sigma=2.0)
    nested = SAG(inner=APG(eta=0.0))
    assert from_config(nested.to_config()).to_config() == nested.to_config()
    with pytest.raises(ValueError, match=r"SAG: sag_scale=-1 is out of range"):
        SAG(sag_scale=-1)
    with pytest.raises(ValueError, match=r"SAG: blur_sigma=0 is out of range"):
        SAG(blur_sigma=0)
    with pytest.raises(ValueError, match=r"SAG: inner=.* with scale=3"):
        SAG(scale=3, inner=CFG())


@pytest.mark.parametrize("name", ["StableDiffusion3Pipeline", "PixArtAlphaPipeline"])
def test_sag_refuses_transformers_by_name(name):
    with pytest.raises(ValueError, match=rf"{name}: SAG reads the self-attention map of its UNet's mid block "
                                         r"\(mid_block.attentions.0.transformer_blocks.0.attn1"):
        apply_guidance(build(name), SAG())


def test_sag_refuses_what_it_cannot_degrade_by_name():
    with pytest.raises(NotImplementedError, match=r"AnimateDiffPipeline: SAG is refused here: its denoiser is a "
                                                  r"UNetMotionModel"):
        apply_guidance(build("AnimateDiffPipeline"), SAG())
    with pytest.raises(NotImplementedError, match=r"StableDiffusionInpaintPipeline: SAG is refused here: its "
                                                  r"denoiser's input or output is not the plain sample"):
        apply_guidance(build("StableDiffusionInpaintPipeline"), SAG())
    name = "StableDiffusionControlNetPipeline"
    pipe = build(name)
    with apply_guidance(pipe, SAG()), pytest.raises(NotImplementedError, match=rf"{name}: SAG is refused with "
                                                                                r"down_block_additional_residuals"):
        run(pipe, call_kwargs(name))


def test_sag_is_refused_as_a_diffusers_guider():
    with pytest.raises(ValueError, match=r"SAG needs an input degraded from the step's own predictions"):
        StrategyGuider(SAG())
