"""PAG as a perturbed branch of the hook: equal to diffusers' own PAG pipelines on the same components, counted
apart, composable, and refused where it cannot be made."""

import pytest
import torch

import diffusers
from pipeline_zoo import build, call_kwargs

from guidance import APG, CFG, PAG, PERTURBED, SLG, Interval, Perturbation, from_config
from pipelines import apply_guidance

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread_per_module")]


def run(pipe, kwargs) -> torch.Tensor:
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def pag_pipeline(base_name: str, pag_name: str, layers: list[str]):
    """diffusers' PAG class on the very components of our tiny plain pipeline."""
    base = build(base_name)
    cls = getattr(diffusers, pag_name)
    parts = {k: v for k, v in base.components.items() if k in cls.__init__.__code__.co_varnames}
    pag = cls(**parts, pag_applied_layers=layers)
    pag.set_progress_bar_config(disable=True)
    return base, pag


CASES = [("StableDiffusionPipeline", "StableDiffusionPAGPipeline", ["mid"]),
         ("StableDiffusionPipeline", "StableDiffusionPAGPipeline", ["down_blocks.1", "up"]),
         ("StableDiffusionXLPipeline", "StableDiffusionXLPAGPipeline", ["mid"]),
         ("StableDiffusion3Pipeline", "StableDiffusion3PAGPipeline", ["transformer_blocks.0"])]


@pytest.mark.parametrize("base_name, pag_name, layers", CASES, ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_pag_equals_diffusers_pag_pipeline(base_name, pag_name, layers):
    base, pag = pag_pipeline(base_name, pag_name, layers)
    kwargs = call_kwargs(base_name)
    native = run(pag, {**kwargs, "pag_scale": 2.5})
    assert rel(native, run(pag, {**kwargs, "pag_scale": 0.0})) > 1e-3  # the perturbation changes the output here
    with apply_guidance(base, PAG(pag_scale=2.5, layers=layers)) as handle:
        ours = run(base, kwargs)
    assert rel(ours, native) <= 1e-5
    steps = int(handle.nfe[0]) // 2
    assert handle.nfe.tolist() == [2 * steps] * native.shape[0]
    assert handle.perturbed_nfe.tolist() == [steps] * native.shape[0] and handle.guide_nfe is None
    assert torch.equal(run(base, kwargs), run(build(base_name), kwargs)), "removal leaves no perturbation behind"


def test_pag_with_adaptive_scale_and_rescale_equals_the_pipeline():
    base, pag = pag_pipeline("StableDiffusionPipeline", "StableDiffusionPAGPipeline", ["mid"])
    kwargs = {**call_kwargs("StableDiffusionPipeline"), "guidance_rescale": 0.5}
    native = run(pag, {**kwargs, "pag_scale": 3.0, "pag_adaptive_scale": 0.004})
    with apply_guidance(base, PAG(pag_scale=3.0, adaptive_scale=0.004)):
        assert rel(run(base, kwargs), native) <= 1e-5


def test_pag_window_and_interval_skip_the_perturbed_rows():
    base = build("StableDiffusionPipeline")
    kwargs = call_kwargs("StableDiffusionPipeline")
    with apply_guidance(base, PAG(pag_scale=2.0, pag_stop=0.5)) as handle:  # 3 steps: int(0.5 * 3) = 1 step
        run(base, kwargs)
    assert handle.perturbed_nfe.tolist() == [1, 1] and handle.nfe.tolist() == [6, 6]
    with apply_guidance(base, Interval(PAG(pag_scale=2.0), start=0.0, stop=0.34)) as handle:
        run(base, kwargs)
    assert handle.perturbed_nfe.tolist() == [1, 1] and handle.nfe.tolist() == [4, 4]


def test_pag_batch_rows_equal_each_sample_alone():
    base = build("StableDiffusionPipeline")
    kwargs = call_kwargs("StableDiffusionPipeline")
    assert len(kwargs["prompt"]) == 2
    with apply_guidance(base, Interval(PAG(pag_scale=2.0), start=0.0, stop=0.67)):
        both = run(base, kwargs)
        first = run(base, {**kwargs, "prompt": kwargs["prompt"][:1]})  # the same generator draws its latents first
    assert rel(both[:1], first) <= 1e-5


def test_pag_config_round_trip_and_bad_layers_are_refused():
    rule = PAG(scale=5.0, pag_scale=2.0, layers=["mid", "up_blocks.0"], adaptive_scale=0.01, pag_stop=0.8)
    again = from_config(rule.to_config())
    assert again.to_config() == rule.to_config() and again.perturbation == Perturbation(
        "identity_attention", ("mid", "up_blocks.0"))
    with pytest.raises(ValueError, match=r"layers pattern 'nowhere' matches no self-attention module of its "
                                         r"UNet2DConditionModel"):
        apply_guidance(build("StableDiffusionPipeline"), PAG(layers=["nowhere"]))
    with pytest.raises(ValueError, match=r"Perturbation: layers=\[\] is invalid"):
        PAG(layers=[])
    with pytest.raises(ValueError, match=r"PAG: pag_scale=-1 is out of range"):
        PAG(pag_scale=-1)


def test_a_strategy_asking_for_perturbed_rows_without_a_perturbation_is_refused():
    class Broken(CFG):
        def branches(self, ctx):
            return {**super().branches(ctx), PERTURBED: ctx.all()}

    pipe = build("StableDiffusionPipeline")
    with apply_guidance(pipe, Broken()), pytest.raises(ValueError, match="asks for the perturbed branch but names no"):
        run(pipe, call_kwargs("StableDiffusionPipeline"))


def test_pag_runs_on_a_sequential_layout():
    """Flux true CFG: two calls per step; the perturbed rows ride on the conditional call."""
    pipe = build("FluxPipeline")
    kwargs = call_kwargs("FluxPipeline")
    plain = run(pipe, kwargs)
    with apply_guidance(pipe, PAG(pag_scale=2.0, layers=["single_transformer_blocks.0"])) as handle:
        ours = run(pipe, kwargs)
    steps = int(handle.nfe[0]) // 2
    assert handle.perturbed_nfe.tolist() == [steps] * plain.shape[0]
    assert torch.isfinite(ours).all() and rel(ours, plain) > 1e-4
    with apply_guidance(pipe, PAG(pag_scale=0.0, layers=["single_transformer_blocks.0"])) as handle:
        assert rel(run(pipe, kwargs), plain) <= 1e-5  # s = 0: CFG, no perturbed evaluation
    assert handle.perturbed_nfe.tolist() == [0] * plain.shape[0]


def test_pag_composes_with_apg_through_the_perturbed_term():
    """PAG's term on top of another rule is what no pipeline offers: here checked to differ from both parts."""
    pipe = build("StableDiffusionPipeline")
    kwargs = call_kwargs("StableDiffusionPipeline")
    with apply_guidance(pipe, APG(eta=0.0)):
        apg = run(pipe, kwargs)
    with apply_guidance(pipe, PAG(pag_scale=2.0)):
        pag = run(pipe, kwargs)
    assert rel(apg, pag) > 1e-4


def test_pag_alone_skips_the_unconditional_rows_and_equals_the_pipeline_without_cfg():
    """PAG at w = 1: c + s (c - p), as diffusers' PAG pipeline computes it at guidance_scale = 1 ([cond; perturbed]);
    through a call that runs CFG, the unconditional rows are not evaluated."""
    base, pag = pag_pipeline("StableDiffusionPipeline", "StableDiffusionPAGPipeline", ["mid"])
    kwargs = call_kwargs("StableDiffusionPipeline")
    native = run(pag, {**kwargs, "guidance_scale": 1.0, "pag_scale": 2.0})
    with apply_guidance(base, PAG(scale=1.0, pag_scale=2.0)) as handle:
        ours = run(base, kwargs)
    assert rel(ours, native) <= 1e-5
    steps = int(handle.perturbed_nfe[0])
    assert handle.nfe.tolist() == [steps] * 2 and steps >= 2


def test_slg_equals_sd3s_own_skip_layer_guidance():
    """StableDiffusion3Pipeline(skip_guidance_layers=...): CFG at every step plus s (c - c_skip) on its window. The
    pipeline's window N start < k < N stop is steps 1, 2 of 3 with start=0, stop=1; ours int(start N) <= k is with
    slg_start=0.34."""
    pipe = build("StableDiffusion3Pipeline")
    kwargs = call_kwargs("StableDiffusion3Pipeline")
    native = run(pipe, {**kwargs, "skip_guidance_layers": [0], "skip_layer_guidance_scale": 2.0,
                        "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 1.0})
    assert rel(native, run(pipe, kwargs)) > 1e-3
    with apply_guidance(pipe, SLG(slg_scale=2.0, layers=[0], slg_start=0.34, slg_stop=1.0)) as handle:
        ours = run(pipe, kwargs)
    assert rel(ours, native) <= 1e-5
    assert handle.perturbed_nfe.tolist() == [2, 2] and handle.nfe.tolist() == [6, 6]
    assert from_config(SLG(layers=[7, 8, 9]).to_config()).to_config() == SLG(layers=[7, 8, 9]).to_config()


def test_slg_refuses_a_denoiser_whose_blocks_are_not_known():
    with pytest.raises(ValueError, match=r"SkipLayerGuide: StableDiffusionPipeline's denoiser is a "
                                         r"UNet2DConditionModel; allowed: DiTTransformer2DModel"):
        apply_guidance(build("StableDiffusionPipeline"), SLG(layers=[0]))
    with pytest.raises(ValueError, match=r"SLG: layers=\[\] is invalid"):
        SLG(layers=[])


def test_perp_neg_runs_its_negative_prompt_as_reference_rows_on_sd():
    from guidance import PerpNeg

    pipe = build("StableDiffusionPipeline")
    kwargs = call_kwargs("StableDiffusionPipeline")
    with apply_guidance(pipe, CFG()):
        cfg = run(pipe, kwargs)
    with apply_guidance(pipe, PerpNeg(negative_prompt="a blurry photo", neg_scale=0.0)) as handle:
        assert rel(run(pipe, kwargs), cfg) <= 1e-6
    with apply_guidance(pipe, PerpNeg(negative_prompt="a blurry photo", neg_scale=1.0)) as handle:
        perp = run(pipe, kwargs)
    steps = 3
    assert handle.nfe.tolist() == [3 * steps, 3 * steps]  # cond, empty uncond and the negative prompt's rows
    assert torch.isfinite(perp).all() and rel(perp, cfg) > 1e-4


def diffusers_guided_transformer(pipe, guider, hook):
    """The SD3 transformer made to return [g; g], with g from diffusers alone: its guider's `forward` on the
    [uncond; cond] halves and a perturbed pass on the conditional inputs with diffusers' `hook(transformer)`
    placed (removed by the returned `undo`). The pipeline's CFG of equal halves then steps with g."""
    transformer, original = pipe.transformer, pipe.transformer.forward
    step = {"i": 0}

    def forward(**kw):
        out = original(**kw)[0]
        b = out.shape[0] // 2
        guider.set_state(step["i"], 3, kw["timestep"])
        step["i"] += 1
        cond_kw = {k: (v[b:] if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == 2 * b else v)
                   for k, v in kw.items()}
        remove = hook(transformer)
        try:
            perturbed = original(**cond_kw)[0]
        finally:
            remove()
        g = guider.forward(out[b:], out[:b], perturbed).pred
        return (torch.cat([g, g]),)

    transformer.forward = forward
    return lambda: setattr(transformer, "forward", original)


def test_seg_equals_diffusers_seg_guider_and_hook_on_sd3():
    from diffusers.guiders import SmoothedEnergyGuidance
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.smoothed_energy_guidance_utils import (SmoothedEnergyGuidanceConfig,
                                                               _apply_smoothed_energy_guidance_hook)

    from guidance import SEG

    def seg_hook(transformer):
        _apply_smoothed_energy_guidance_hook(transformer, SmoothedEnergyGuidanceConfig([0]), 2.0, name="ref_seg")
        return lambda: HookRegistry.check_if_exists_or_initialize(transformer).remove_hook("ref_seg", recurse=True)

    pipe = build("StableDiffusion3Pipeline")
    kwargs = call_kwargs("StableDiffusion3Pipeline")
    guider = SmoothedEnergyGuidance(guidance_scale=kwargs["guidance_scale"], seg_guidance_scale=3.0,
                                    seg_blur_sigma=2.0, seg_guidance_layers=[0])
    undo = diffusers_guided_transformer(pipe, guider, seg_hook)
    try:
        reference = run(pipe, kwargs)
    finally:
        undo()
    plain = run(pipe, kwargs)
    assert rel(reference, plain) > 1e-3  # the SEG term changes the output here
    with apply_guidance(pipe, SEG(seg_scale=3.0, layers=[0], blur_sigma=2.0)) as handle:
        ours = run(pipe, kwargs)
    assert rel(ours, reference) <= 1e-5
    assert handle.perturbed_nfe.tolist() == [2, 2]  # the guider's window skips step 0
    with pytest.raises(ValueError, match=r"SEG's blocks='nowhere', layers=\['0'\] cannot be found"):
        apply_guidance(build("StableDiffusion3Pipeline"), SEG(layers=[0], blocks="nowhere"))


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_pag_equals_the_pag_pipeline_under_other_schedulers(scheduler):
    base, pag = pag_pipeline("StableDiffusionPipeline", "StableDiffusionPAGPipeline", ["mid"])
    for pipe in (base, pag):
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    kwargs = call_kwargs("StableDiffusionPipeline")
    native = run(pag, {**kwargs, "pag_scale": 2.0})
    with apply_guidance(base, PAG(pag_scale=2.0)):
        assert rel(run(base, kwargs), native) <= 1e-5


def test_pag_in_bfloat16_is_as_close_to_float32_as_the_pag_pipeline_itself():
    base, pag = pag_pipeline("StableDiffusionPipeline", "StableDiffusionPAGPipeline", ["mid"])
    kwargs = {**call_kwargs("StableDiffusionPipeline"), "output_type": "latent"}
    reference = run(pag, {**kwargs, "pag_scale": 2.0}).float()
    base.to(torch.bfloat16)
    pag.to(torch.bfloat16)
    native = run(pag, {**kwargs, "pag_scale": 2.0}).float()
    with apply_guidance(base, PAG(pag_scale=2.0)):
        ours = run(base, kwargs).float()
    own_error = rel(native, reference)
    assert 0 < own_error < 0.1 and rel(ours, reference) <= 1.5 * own_error


def test_pag_composes_with_another_rule_in_place_of_its_cfg_term():
    """PAG(inner=rule): rule(c, u) + s (c - p), what no pipeline or guider offers: with CFG inside it is PAG itself,
    with APG(eta=1, r=0, beta=0) inside (CFG) too up to the x0 round trip, with CFG-Zero* inside something else."""
    base = build("StableDiffusionPipeline")
    kwargs = call_kwargs("StableDiffusionPipeline")
    with apply_guidance(base, PAG(pag_scale=2.0)):
        pag = run(base, kwargs)
    with apply_guidance(base, PAG(pag_scale=2.0, inner=CFG())) as handle:
        assert rel(run(base, kwargs), pag) <= 1e-6
    assert handle.perturbed_nfe.tolist() == [3, 3] and handle.nfe.tolist() == [6, 6]
    with apply_guidance(base, PAG(pag_scale=2.0, inner=APG(eta=1.0, norm_threshold=0.0, momentum=0.0))):
        assert rel(run(base, kwargs), pag) <= 1e-3
    from guidance import CFGZeroStar

    rule = PAG(pag_scale=2.0, inner=CFGZeroStar(zero_init_steps=0))
    with apply_guidance(base, rule):
        zero_star = run(base, kwargs)
    assert torch.isfinite(zero_star).all() and rel(zero_star, pag) > 1e-4
    assert from_config(rule.to_config()).to_config() == rule.to_config()
    with pytest.raises(ValueError, match="allowed: inner a GuidanceStrategy with scale=None"):
        PAG(scale=3.0, inner=CFG())


def test_ag_style_truncation_of_the_perturbed_branch_saves_its_rows():
    """truncation=-1: every sample's cosine of c and p reaches it at the first step, so from the next step on the
    perturbed rows are not evaluated: the same images as PAG's window on the first of 3 steps, and its NFE.
    truncation=1: never reached on these predictions, PAG on every step."""
    pipe = build("StableDiffusionPipeline")
    kwargs = call_kwargs("StableDiffusionPipeline")
    with apply_guidance(pipe, PAG(pag_scale=2.0, pag_stop=0.34)) as window:
        first_step_only = run(pipe, kwargs)
    with apply_guidance(pipe, PAG(pag_scale=2.0, truncation=-1.0)) as handle:
        truncated = run(pipe, kwargs)
    assert torch.equal(truncated, first_step_only)
    assert handle.perturbed_nfe.tolist() == window.perturbed_nfe.tolist() == [1, 1]
    assert handle.strategy.perturbed_switch_step.tolist() == [0, 0]
    with apply_guidance(pipe, PAG(pag_scale=2.0)) as plain_handle:
        plain = run(pipe, kwargs)
    with apply_guidance(pipe, PAG(pag_scale=2.0, truncation=1.0)) as handle:
        assert torch.equal(run(pipe, kwargs), plain)
    assert handle.perturbed_nfe.tolist() == plain_handle.perturbed_nfe.tolist() == [3, 3]
    assert from_config(PAG(truncation=0.99).to_config()).truncation == 0.99
    with pytest.raises(ValueError, match=r"PAG: truncation=2 is out of range"):
        PAG(truncation=2)
