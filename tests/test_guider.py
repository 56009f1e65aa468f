"""`pipelines.guider.StrategyGuider` on tiny modular SDXL and SD3 pipelines (diffusers' own blocks, a tiny
denoiser from a config, random prompt embeddings: the guider never sees the text encoders).

Checked against diffusers' own `ClassifierFreeGuidance` guider in the same pipeline: CFG exact,
APG(eta=1, r=0, beta=0) equal to CFG, Interval equal to diffusers' start/stop window with the same
denoiser calls saved, and save_pretrained / from_pretrained round trips.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.guiders import (AdaptiveProjectedMixGuidance, ClassifierFreeGuidance, ClassifierFreeZeroStarGuidance,
                              SmoothedEnergyGuidance,
                               FrequencyDecoupledGuidance, MagnitudeAwareGuidance, TangentialClassifierFreeGuidance)
from diffusers.modular_pipelines import SequentialPipelineBlocks
from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
    StableDiffusion3T2ICoreDenoiseStep,
)
from diffusers.modular_pipelines.stable_diffusion_xl.before_denoise import (
    StableDiffusionXLInputStep,
    StableDiffusionXLPrepareAdditionalConditioningStep,
    StableDiffusionXLPrepareLatentsStep,
    StableDiffusionXLSetTimestepsStep,
)
from diffusers.modular_pipelines.stable_diffusion_xl.denoise import StableDiffusionXLDenoiseStep

import tiny_pipelines as tp
from guidance import (APG, CFG, FDG, MAMBOG, SEG, SLG, TCFG, AdaptiveGuidance, APGMix, Autoguidance, CFGZeroStar, DynamicCFG,
                      GuidanceStrategy, Interval)
from pipelines.guider import StrategyGuider

SCALE, STEPS, BATCH = 5.0, 4, 2


def _sdxl_blocks():
    return SequentialPipelineBlocks.from_blocks_dict({
        "input": StableDiffusionXLInputStep, "set_timesteps": StableDiffusionXLSetTimestepsStep,
        "prepare_latents": StableDiffusionXLPrepareLatentsStep,
        "prepare_add_cond": StableDiffusionXLPrepareAdditionalConditioningStep,
        "denoise": StableDiffusionXLDenoiseStep,
    })


def _embeds(text_dim: int, pooled_dim: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(prompt_embeds=torch.randn(BATCH, 8, text_dim, generator=g),
                negative_prompt_embeds=torch.randn(BATCH, 8, text_dim, generator=g),
                pooled_prompt_embeds=torch.randn(BATCH, pooled_dim, generator=g),
                negative_pooled_prompt_embeds=torch.randn(BATCH, pooled_dim, generator=g))


def _sdxl():
    """SDXL (epsilon, Euler discrete, the UNet called with a positional sample)."""
    parts = tp.build("sdxl").components
    pipe = _sdxl_blocks().init_pipeline()
    pipe.update_components(unet=parts["unet"], scheduler=parts["scheduler"])
    c = parts["unet"].config
    return pipe, pipe.unet, _embeds(c.cross_attention_dim, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim)


def _sd3():
    """SD3 (flow matching, the transformer called with hidden_states=)."""
    parts = tp.build("sd3").components
    pipe = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=parts["transformer"], scheduler=parts["scheduler"], vae=parts["vae"])
    c = parts["transformer"].config
    return pipe, pipe.transformer, _embeds(c.joint_attention_dim, c.pooled_projection_dim)


def _counting_runner(pipe, denoiser, embeds):
    """A function that runs the modular pipeline with a given guider and returns (latents, denoiser calls), and
    the handle of the counting hook."""
    pipe.set_progress_bar_config(disable=True)
    calls = []
    handle = denoiser.register_forward_pre_hook(lambda module, args: calls.append(1))

    def run(guider):
        pipe.update_components(guider=guider)
        calls.clear()
        out = pipe(**embeds, num_inference_steps=STEPS, height=64, width=64,
                   generator=torch.Generator().manual_seed(1), output="latents")
        return out, len(calls)

    return run, handle


@pytest.fixture(scope="module", params=["sdxl", "sd3"])
def modular(request):
    """A modular pipeline built from diffusers' own blocks and a function that runs it with a given
    guider, counting the denoiser's forward calls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe, denoiser, embeds = {"sdxl": _sdxl, "sd3": _sd3}[request.param]()
    run, handle = _counting_runner(pipe, denoiser, embeds)
    yield pipe, run
    handle.remove()
    torch.set_num_threads(n)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def native(modular):
    return modular[1](ClassifierFreeGuidance(guidance_scale=SCALE))


def test_cfg_equals_diffusers_guider(modular, native):
    pipe, run = modular
    ref, ref_calls = native
    for strategy in (CFG(), CFG(scale=SCALE)):  # the guider's scale, or the strategy's own
        out, calls = run(StrategyGuider(strategy, guidance_scale=SCALE))
        assert rel(out, ref) <= 1e-5
        assert calls == ref_calls == 2 * STEPS
    ref, _ = run(ClassifierFreeGuidance(guidance_scale=SCALE, guidance_rescale=0.7))
    out, _ = run(StrategyGuider(CFG(), guidance_scale=SCALE, guidance_rescale=0.7))  # CFG takes the guider's phi
    assert rel(out, ref) <= 1e-5 and rel(ref, native[0]) > 1e-3


def test_apg_as_cfg_equals_cfg(modular, native):
    pipe, run = modular
    ref, _ = native
    paper = StrategyGuider(APG(eta=1.0, norm_threshold=0.0, momentum=0.0), guidance_scale=SCALE,
                           scheduler=pipe.scheduler)  # x0 space: needs the noise level
    assert rel(run(paper)[0], ref) <= 1e-5
    model_space = StrategyGuider(APG(SCALE, eta=1.0, norm_threshold=0.0, momentum=0.0, mode="diffusers"))
    assert rel(run(model_space)[0], ref) <= 1e-5


def test_apg_paper_mode_differs_from_cfg(modular, native):
    """The default APG really guides differently (so the equalities above are not vacuous)."""
    pipe, run = modular
    out, _ = run(StrategyGuider(APG(norm_threshold=1.0), guidance_scale=SCALE, scheduler=pipe.scheduler))
    assert torch.isfinite(out).all() and rel(out, native[0]) > 1e-3


def test_interval_saves_unconditional_calls(modular):
    pipe, run = modular
    ref, ref_calls = run(ClassifierFreeGuidance(guidance_scale=SCALE, start=0.5))
    guider = StrategyGuider(Interval(CFG(), start=0.5), guidance_scale=SCALE)
    out, calls = run(guider)
    assert calls == ref_calls == STEPS + STEPS // 2  # steps 0, 1 run the conditional batch alone
    assert guider.nfe_per_sample == calls
    assert rel(out, ref) <= 1e-5
    # A sigma window holding the last half of the steps (sigma: Euler's VE sigma on SDXL, s on SD3).
    sigma_max = float(pipe.scheduler.sigmas[STEPS // 2])  # the schedule of the call above (same steps)
    _, calls = run(StrategyGuider(Interval(CFG(), sigma_max=sigma_max), guidance_scale=SCALE, scheduler=pipe.scheduler))
    assert calls == STEPS + STEPS // 2


def test_adaptive_guidance_saves_calls(modular):
    """Per-sample state across steps: with threshold -1 every sample switches after the first step."""
    pipe, run = modular
    guider = StrategyGuider(AdaptiveGuidance(threshold=-1.0), guidance_scale=SCALE, scheduler=pipe.scheduler)
    out, calls = run(guider)
    assert calls == guider.nfe_per_sample == STEPS + 1
    assert torch.isfinite(out).all()


def test_x0_strategy_without_scheduler_says_so(modular):
    _, run = modular
    with pytest.raises(ValueError, match="scheduler=pipe.scheduler"):
        run(StrategyGuider(APG(), guidance_scale=SCALE))


def test_save_and_load_round_trip(modular, native, tmp_path):
    pipe, run = modular
    guider = StrategyGuider(Interval(APG(eta=1.0, norm_threshold=0.0, momentum=0.0), start=0.25), guidance_scale=SCALE)
    guider.save_pretrained(tmp_path)
    loaded = StrategyGuider.from_pretrained(tmp_path, scheduler=pipe.scheduler)
    assert loaded.strategy.to_config() == guider.strategy.to_config()
    assert loaded.guidance_scale == SCALE and loaded.scheduler is pipe.scheduler
    assert loaded.new(guidance_scale=3.0).scheduler is pipe.scheduler
    assert loaded.new(guidance_scale=3.0).guidance_scale == 3.0
    out, calls = run(loaded)
    assert calls == STEPS + STEPS - STEPS // 4


def test_refuses_what_a_guider_cannot_give():
    with pytest.raises(ValueError, match="DynamicCFG needs the pipeline call"):
        StrategyGuider(DynamicCFG())

    class Reference(CFG):
        def reference_labels(self, ctx):
            return ctx.none().long()

    with pytest.raises(ValueError, match="reference-class branch"):
        StrategyGuider(Interval(Reference()))
    with pytest.raises(ValueError, match="Autoguidance needs a guide model's prediction"):
        StrategyGuider(Interval(Autoguidance()))
    assert StrategyGuider(Autoguidance(mix=0.0)).strategy.mix == 0.0  # mix=0 is CFG: no guide model needed
    with pytest.raises(ValueError, match="guidance_scale"):
        StrategyGuider(CFG(), guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="strategy"):
        StrategyGuider("CFG")
    assert isinstance(StrategyGuider({"name": "CFG", "params": {}}).strategy, GuidanceStrategy)


class _FirstSampleOnly(CFG):
    """CFG that asks for the unconditional branch of sample 0 only, and records what it is given."""

    def branches(self, ctx):
        uncond = ctx.none()
        uncond[0] = True
        return {"cond": ctx.all(), "uncond": uncond}

    def combine(self, ctx, preds):
        self.seen = preds["uncond"].clone()
        return preds["cond"]


def test_partial_unconditional_runs_the_batch_and_hides_other_rows():
    """A guider runs whole batches: the unconditional batch runs for all, and the rows of samples that
    did not ask for it reach the strategy as NaN (the strategy contract)."""
    strategy = _FirstSampleOnly()
    guider = StrategyGuider(strategy, guidance_scale=SCALE)
    guider.set_state(step=0, num_inference_steps=1, timestep=torch.tensor(999))
    embeds = torch.ones(2, 3)
    batches = guider.prepare_inputs({"prompt_embeds": (embeds, -embeds)})
    assert guider.num_conditions == 2 and len(batches) == 2
    assert torch.equal(batches[1].prompt_embeds, -embeds)
    cond, uncond = torch.zeros(2, 4), torch.ones(2, 4)
    out = guider.forward(cond, uncond)
    assert torch.equal(out.pred, cond)
    assert torch.equal(strategy.seen[0], uncond[0]) and bool(strategy.seen[1].isnan().all())
    assert guider.num_conditions == 2  # no step planned: the pipeline must still encode the negative prompt


GUIDER_RULES = {  # ours, diffusers' guider, at the same settings
    "CFGZeroStar": lambda: (CFGZeroStar(SCALE), ClassifierFreeZeroStarGuidance(guidance_scale=SCALE)),
    "TCFG": lambda: (TCFG(SCALE), TangentialClassifierFreeGuidance(guidance_scale=SCALE)),
    "FDG": lambda: (FDG([SCALE, 2.0], parallel_weights=0.5),
                    FrequencyDecoupledGuidance(guidance_scales=[SCALE, 2.0], parallel_weights=0.5)),
    "APGMix": lambda: (APGMix(SCALE, apg_scale=8.0, apg_start_step=1),
                       AdaptiveProjectedMixGuidance(guidance_scale=SCALE, adaptive_projected_guidance_scale=8.0,
                                                    adaptive_projected_guidance_start_step=1)),
}


@pytest.mark.parametrize("name", sorted(GUIDER_RULES))
def test_field_rules_equal_diffusers_guiders(modular, native, name):
    """The same modular pipeline with diffusers' guider and with StrategyGuider wrapping ours."""
    _, run = modular
    ours, theirs = GUIDER_RULES[name]()
    ref, ref_calls = run(theirs)
    guider = StrategyGuider(ours)
    out, calls = run(guider)
    assert rel(out, ref) <= 1e-5 and rel(ref, native[0]) > 1e-3
    zeroed = 1 if name == "CFGZeroStar" else 0  # its zeroed first step needs no unconditional batch
    assert calls == ref_calls - zeroed == guider.nfe_per_sample


def test_mambo_g_runs_where_diffusers_guider_raises(modular, native):
    """diffusers' MagnitudeAwareGuidance raises on these (B, C, H, W) latents (see guidance/mambo.py)."""
    _, run = modular
    with pytest.raises(RuntimeError, match="dim must be a 2-tuple"):
        run(MagnitudeAwareGuidance(guidance_scale=SCALE))
    out, calls = run(StrategyGuider(MAMBOG(SCALE, alpha=1.0)))
    assert torch.isfinite(out).all() and calls == 2 * STEPS and rel(out, native[0]) > 1e-3


def _modular_sd3_runner():
    pipe, denoiser, embeds = _sd3()
    run, _ = _counting_runner(pipe, denoiser, embeds)

    def hooks_left():
        return [name for name, m in denoiser.named_modules() if getattr(m, "_diffusers_hook", None) is not None
                and m._diffusers_hook.hooks]

    return pipe, run, hooks_left


def test_seg_and_slg_run_their_perturbed_batch_inside_their_window_in_a_modular_sd3():
    """The perturbed batch runs on the conditional inputs with the perturbation placed in prepare_models and
    removed in cleanup_models, as diffusers' SEG / SLG guiders intend. Neither can be the reference in diffusers
    0.42.1: SmoothedEnergyGuidance.prepare_models never counts the batches it prepares, so its hook is never
    placed and it returns CFG after an extra unperturbed call (tracked below); SkipLayerGuidance's
    `skip_layer_guidance_layers` builds LayerSkipConfig(layer) with an int where a list is needed, and its block
    skip returns SD3's two streams in the wrong order (pipelines/skip_layer.py). SEG's exactness is checked
    against its guider's `forward` and hook in tests/test_pag.py, SLG against SD3's own skip_guidance_layers."""
    pipe, run, hooks_left = _modular_sd3_runner()
    plain, plain_calls = run(ClassifierFreeGuidance(guidance_scale=SCALE))
    theirs, theirs_calls = run(SmoothedEnergyGuidance(guidance_scale=SCALE, seg_guidance_scale=3.0,
                                                      seg_blur_sigma=2.0, seg_guidance_layers=[0]))
    assert theirs_calls == plain_calls + 3 and rel(theirs, plain) == 0.0  # the upstream bug, tracked
    for rule, perturbed in ((SEG(SCALE, seg_scale=3.0, layers=[0], blur_sigma=2.0), 3),  # steps 1-3 of 4
                            (SLG(SCALE, slg_scale=2.0, layers=[0], slg_start=0.0, slg_stop=0.5), 2)):  # steps 0, 1
        guider = StrategyGuider(rule, scheduler=pipe.scheduler)
        got, got_calls = run(guider)
        assert guider.perturbed_nfe_per_sample == perturbed and got_calls == plain_calls + perturbed
        assert guider.nfe_per_sample == plain_calls
        assert torch.isfinite(got).all() and rel(got, plain) > 1e-3 and not hooks_left()
