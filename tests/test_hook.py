"""apply_guidance on tiny offline diffusers pipelines: exactness, removal, NFE accounting, errors."""

import pytest
import torch
from tiny_pipelines import CFG_KWARG, PIPELINE_NAMES, build, call_kwargs, denoiser

from guidance import APG, CFG, Interval
from pipelines import apply_guidance

NEGATIVE_OK = [n for n in PIPELINE_NAMES if n != "dit"]


def run(pipe, name, seed=0, **kw):
    torch.manual_seed(seed)  # DiT's stochastic schedulers draw from the global RNG
    return pipe(**{**call_kwargs(name), **kw}, generator=torch.Generator().manual_seed(seed)).images


def variants(name):
    yield {}
    if name != "dit":
        yield call_kwargs(name, num_images_per_prompt=2)
        yield call_kwargs(name, negative_prompt=True)


def batch_and_alone(pipe, strategy, seeds=(5, 6), **overrides):
    """(images, nfe) of two prompts in one batch, and of each prompt alone with the same seed."""
    kw = call_kwargs("sd", **overrides)
    prompts = kw.pop("prompt")
    with apply_guidance(pipe, strategy) as handle:
        both = pipe(prompt=prompts, **kw, generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        nfe_both = handle.nfe.tolist()
        alone, nfe_alone = [], []
        for p, s in zip(prompts, seeds):
            alone.append(pipe(prompt=[p], **kw, generator=torch.Generator().manual_seed(s)).images)
            nfe_alone += handle.nfe.tolist()
    return both, torch.cat(alone), nfe_both, nfe_alone


def count_rows(module):
    """Wrap the denoiser's forward (below the hook) to count the rows it really evaluates."""
    counter = {"rows": 0, "calls": 0}
    original = module.forward

    def counting_forward(*args, **kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        counter["rows"] += x.shape[0]
        counter["calls"] += 1
        return original(*args, **kwargs)

    module.forward = counting_forward
    return counter


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_cfg_through_the_hook_equals_native_cfg(name):
    pipe = build(name)
    for kw in variants(name):
        native = run(pipe, name, **kw)
        with apply_guidance(pipe, CFG()):
            hooked = run(pipe, name, **kw)
        assert hooked.shape == native.shape
        assert (hooked - native).abs().max().item() <= 1e-5, kw


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_apg_reduced_to_cfg_equals_native_cfg(name):
    pipe = build(name)
    native = run(pipe, name)
    with apply_guidance(pipe, APG(eta=1.0, norm_threshold=0.0, momentum=0.0)):
        hooked = run(pipe, name)
    assert (hooked - native).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_apg_changes_the_images_and_stays_finite(name):
    pipe = build(name)
    native = run(pipe, name)
    with apply_guidance(pipe, APG(norm_threshold=0.5, momentum=-0.5)):
        guided = run(pipe, name)
    assert torch.isfinite(guided).all()
    assert (guided - native).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_remove_and_context_exit_restore_bit_identical_behaviour(name):
    pipe = build(name)
    cls, forward = type(pipe), denoiser(pipe).forward
    before = run(pipe, name)
    handle = apply_guidance(pipe, APG())
    run(pipe, name)
    handle.remove()
    assert torch.equal(run(pipe, name), before)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_guidance(pipe, APG()):
            raise RuntimeError("boom")
    assert torch.equal(run(pipe, name), before)
    assert type(pipe) is cls and denoiser(pipe).forward == forward


@pytest.mark.parametrize("name", PIPELINE_NAMES)
def test_nfe_accounting_equals_rows_the_model_evaluated(name):
    pipe = build(name)
    counter = count_rows(denoiser(pipe))
    steps = call_kwargs(name)["num_inference_steps"]
    with apply_guidance(pipe, CFG()) as handle:
        run(pipe, name)
    assert handle.nfe.tolist() == [2 * steps] * 2
    assert counter["rows"] == int(handle.nfe.sum())
    counter["rows"] = 0
    with apply_guidance(pipe, Interval(CFG(), start=0.0, stop=0.34)) as handle:  # guided on step 0 of 3
        run(pipe, name)
    assert handle.nfe.tolist() == [steps + 1] * 2
    assert counter["rows"] == int(handle.nfe.sum())


@pytest.mark.parametrize("name", ["sd", "dit", "flux"])
def test_interval_skips_uncond_and_matches_cfg_inside(name):
    # Guidance on everywhere through Interval equals plain CFG; off everywhere equals the cond-only model.
    pipe = build(name)
    with apply_guidance(pipe, CFG()):
        cfg = run(pipe, name)
    with apply_guidance(pipe, Interval(CFG(), start=0.0, stop=1.0)):
        assert torch.allclose(run(pipe, name), cfg, atol=1e-5)
    with apply_guidance(pipe, Interval(CFG(), sigma_max=1e-9)):  # no step's noise level is that low
        cond_only = run(pipe, name)
    with apply_guidance(pipe, CFG(scale=1.0)):
        assert torch.allclose(run(pipe, name), cond_only, atol=1e-5)


@pytest.mark.parametrize("name", ["sd", "sd3", "dit", "flux"])
def test_explicit_scale_overrides_the_call_scale(name):
    pipe = build(name)
    key = CFG_KWARG[name]
    native = run(pipe, name, **{key: 2.5})
    with apply_guidance(pipe, CFG(scale=2.5)):
        hooked = run(pipe, name)  # the call keeps its own (different) scale
    assert call_kwargs(name)[key] != 2.5
    assert (hooked - native).abs().max().item() <= 1e-5


def test_v_prediction_apg_reduced_to_cfg_equals_native():
    pipe = build("sd", prediction_type="v_prediction")
    native = run(pipe, "sd")
    with apply_guidance(pipe, APG(eta=1.0, norm_threshold=0.0, momentum=0.0)):
        assert (run(pipe, "sd") - native).abs().max().item() <= 1e-4


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                                       "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                                       "UniPCMultistepScheduler"])
def test_x0_space_guidance_is_exact_under_every_scheduler(scheduler):
    pipe = build("sd", scheduler=scheduler)
    native = run(pipe, "sd")
    with apply_guidance(pipe, APG(eta=1.0, norm_threshold=0.0, momentum=0.0)):
        assert (run(pipe, "sd") - native).abs().max().item() <= 1e-4


def test_state_is_per_call_and_per_sample():
    pipe = build("sd")
    strategy = APG(norm_threshold=0.5, momentum=-0.75)
    with apply_guidance(pipe, strategy):
        first = run(pipe, "sd")
        assert torch.equal(run(pipe, "sd"), first)  # momentum reset at every call
    both, alone, _, _ = batch_and_alone(pipe, strategy, seeds=(11, 12))
    assert (both - alone).abs().max().item() <= 1e-5


def test_a_pipeline_without_guidance_gets_a_type_error_saying_so():
    from diffusers import DDPMPipeline, UNet2DModel, DDPMScheduler

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(TypeError, match="DDPMPipeline is not in guidance-kit's pipeline table \\(a diffusers pipeline that runs no guidance"):
        apply_guidance(DDPMPipeline(unet, DDPMScheduler()), CFG())


@pytest.mark.parametrize("name", ["sd", "dit", "flux"])
def test_guidance_off_in_the_call_gets_a_clear_error(name):
    pipe = build(name)
    hint = "true_cfg_scale > 1 and a negative_prompt" if name == "flux" else "guidance_scale > 1"
    with apply_guidance(pipe, APG()):
        with pytest.raises(ValueError, match=hint):
            pipe(**call_kwargs(name, cfg=False), generator=torch.Generator().manual_seed(0))


def test_applying_twice_is_refused_and_strategy_type_is_checked():
    pipe = build("sd")
    with apply_guidance(pipe, CFG()):
        with pytest.raises(RuntimeError, match="already has a guidance strategy"):
            apply_guidance(pipe, CFG())
    with pytest.raises(TypeError, match="not a guidance.GuidanceStrategy"):
        apply_guidance(pipe, "cfg")


@pytest.mark.parametrize("make", [lambda: CFG(scale=1e308), lambda: APG(scale=3.0, eta=1e30, norm_threshold=0.0),
                                  lambda: CFG(scale=lambda ctx: float("nan") if ctx.step == 2 else 3.0)],
                         ids=["huge scale", "huge eta", "callable nan at step 2"])
def test_a_guided_prediction_that_stops_being_finite_is_an_error(make):
    """Numbers that cannot be right are not returned as images: the error names the strategy, scale and step."""
    from pipelines import load_embedded

    pipe = load_embedded("cpu").pipe
    with apply_guidance(pipe, make()):
        with pytest.raises(ValueError, match=r"holds NaN or inf from step \d+ of 4; the images are not valid"):
            pipe(class_labels=[0, 1], num_inference_steps=4, guidance_scale=3.0, output_type="pt")
    with apply_guidance(pipe, CFG()):  # the pipeline is usable afterwards
        images = pipe(class_labels=[0, 1], num_inference_steps=4, guidance_scale=3.0, output_type="pt").images
    assert torch.isfinite(images).all()


def test_a_step_window_that_holds_no_step_is_refused_at_the_first_step():
    """Before: Interval(start=stop) or a window between two steps never guided and said nothing."""
    pipe = build("sd")
    with pytest.raises(ValueError, match=r"Interval: stop=0.5 is not above start=0.5"):
        Interval(CFG(), start=0.5, stop=0.5)
    with apply_guidance(pipe, Interval(CFG(), start=0.1, stop=0.3)):  # 3 steps: int(0.3) = int(0.9) = 0
        with pytest.raises(ValueError, match=r"holds none of this call's 3 scheduler steps.*stop >= 0.333333"):
            run(pipe, "sd")
