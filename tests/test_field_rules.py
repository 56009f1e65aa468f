"""The rules that diffusers' guiders ship on the two predictions (CFG-Zero*, TCFG, MAMBO-G, APG-Mix), exact
against those guiders: on random tensors over several steps (state carried), in fp32 and half precision,
inside real pipelines through `apply_guidance` (batched SD, sequential Flux true CFG, the embedded model), and
through `StrategyGuider` in modular SDXL / SD3 pipelines.

In a pipeline the reference is the diffusers guider itself run through the same hook (`GuiderRule` below
hands it our two predictions at every step), so both sides see the same denoiser outputs and only the rule
differs.
"""

from __future__ import annotations

from typing import Callable, Mapping

import pytest
import torch
from diffusers.guiders import (AdaptiveProjectedMixGuidance, ClassifierFreeZeroStarGuidance,
                               FrequencyDecoupledGuidance, MagnitudeAwareGuidance, TangentialClassifierFreeGuidance)
from diffusers.guiders.adaptive_projected_guidance_mix import MomentumBuffer

import guidance
import tiny_pipelines as tp
from guidance import (APGMix, CFGZeroStar, COND, MAMBOG, TCFG, UNCOND, GuidanceStrategy, Interval, Parametrization,
                      StepContext)
from pipelines import apply_guidance, load_embedded

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

STEPS = 7  # past APG-Mix's default switch (step > 5)

# (ours, the diffusers guider) at the same settings; the scale is the guider's, so ours gets it explicitly.
RULES: dict[str, Callable[[float], tuple[GuidanceStrategy, object]]] = {
    "CFGZeroStar": lambda w: (CFGZeroStar(w), ClassifierFreeZeroStarGuidance(guidance_scale=w)),
    "CFGZeroStar 2 zero steps, original": lambda w: (
        CFGZeroStar(w, zero_init_steps=2, use_original_formulation=True),
        ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=2, use_original_formulation=True)),
    "TCFG": lambda w: (TCFG(w), TangentialClassifierFreeGuidance(guidance_scale=w)),
    "TCFG original": lambda w: (TCFG(w, use_original_formulation=True),
                                TangentialClassifierFreeGuidance(guidance_scale=w, use_original_formulation=True)),
    "MAMBOG": lambda w: (MAMBOG(w, alpha=2.0), MagnitudeAwareGuidance(guidance_scale=w, alpha=2.0)),
    "MAMBOG original": lambda w: (MAMBOG(w, alpha=2.0, use_original_formulation=True),
                                 MagnitudeAwareGuidance(guidance_scale=w, alpha=2.0, use_original_formulation=True)),
    "FDG": lambda w: (guidance.FDG([w, w / 2]), FrequencyDecoupledGuidance(guidance_scales=[w, w / 2])),
    "FDG parallel weights, original": lambda w: (
        guidance.FDG([w, 2.0, w / 2], parallel_weights=[0.5, 1.0, 0.2], use_original_formulation=True),
        FrequencyDecoupledGuidance(guidance_scales=[w, 2.0, w / 2], parallel_weights=[0.5, 1.0, 0.2],
                                   use_original_formulation=True)),
    "APGMix": lambda w: (APGMix(w, apg_scale=6.0, momentum=-0.5, norm_threshold=3.0, eta=0.2, apg_start_step=2),
                         AdaptiveProjectedMixGuidance(guidance_scale=w, adaptive_projected_guidance_scale=6.0,
                                                      adaptive_projected_guidance_momentum=-0.5,
                                                      adaptive_projected_guidance_rescale=3.0, eta=0.2,
                                                      adaptive_projected_guidance_start_step=2)),
}


class GuiderRule(GuidanceStrategy):
    """A diffusers guider as a strategy (tests only): both branches every step, the guider's own forward."""

    def __init__(self, guider):
        self.guider = guider

    def guide(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        step_guider(self.guider, ctx.scheduler_step, ctx.num_scheduler_steps)
        return guider_forward(self.guider, preds[COND], preds[UNCOND])


def guider_forward(guider, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """The guider's prediction. diffusers' MagnitudeAwareGuidance takes torch.norm over all non-batch dims,
    which raises for more than two: it gets a (B, 1, D) view, the same norms (see guidance/mambo.py)."""
    if isinstance(guider, MagnitudeAwareGuidance) and cond.ndim > 3:
        return guider.forward(cond.flatten(1)[:, None], uncond.flatten(1)[:, None]).pred.view_as(cond)
    return guider.forward(cond, uncond).pred


def step_guider(guider, step: int, steps: int) -> None:
    """What a modular pipeline does to a guider at each step (prepare_inputs makes APG-Mix's buffer at step 0)."""
    guider.set_state(step=step, num_inference_steps=steps, timestep=torch.tensor(999.0 - step))
    if step == 0 and isinstance(guider, AdaptiveProjectedMixGuidance):
        guider.momentum_buffer = MomentumBuffer(guider.adaptive_projected_guidance_momentum)


def context(step: int, batch: int, shape: tuple[int, ...]) -> StepContext:
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(step))
    half = torch.full((batch,) + (1,) * len(shape), 0.5 ** 0.5, dtype=torch.float64)
    return StepContext(step, STEPS, 999.0 - step, Parametrization("epsilon", x, half, half))


def run_steps(ours: GuidanceStrategy, theirs, dtype: torch.dtype, shape=(4, 8, 8), batch=3):
    """Both rules over STEPS steps of random predictions (the same ones), in `dtype`; outputs per step."""
    ours.reset()
    out_ours, out_theirs = [], []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 + step)
        cond = torch.randn(batch, *shape, generator=g)
        uncond = 0.8 * cond + 0.6 * torch.randn(batch, *shape, generator=g)  # correlated, as real branches are
        preds = {COND: cond.to(dtype), UNCOND: uncond.to(dtype)}
        out_ours.append(guidance.guided_prediction(ours, context(step, batch, shape), preds))
        step_guider(theirs, step, STEPS)
        out_theirs.append(guider_forward(theirs, preds[COND], preds[UNCOND]))
    return out_ours, out_theirs


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("name", sorted(RULES))
def test_equals_the_diffusers_guider_over_steps_in_fp32(name):
    ours, theirs = run_steps(*RULES[name](4.0), torch.float32)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert a.dtype == b.dtype == torch.float32
        if b.abs().max() == 0:  # CFG-Zero*'s zeroed steps
            assert torch.equal(a, b), step
        else:
            assert max_rel(a, b) <= 1e-6, (step, max_rel(a, b))
    assert any(not torch.equal(a, b) for a, b in zip(ours, run_steps(*RULES[name](3.0), torch.float32)[0])), \
        "the scale must matter (not a vacuous equality)"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(RULES))
def test_half_precision_is_no_further_from_fp32_than_the_guider(name, dtype):
    exact = run_steps(*RULES[name](4.0), torch.float32)[1]
    ours, theirs = run_steps(*RULES[name](4.0), dtype)
    for a, b, ref in zip(ours, theirs, exact):
        assert a.dtype == dtype
        scale = ref.abs().max().clamp_min(1e-30)
        ours_err, theirs_err = (a.float() - ref).abs().max() / scale, (b.float() - ref).abs().max() / scale
        assert ours_err <= 1.5 * theirs_err + 1e-2 * float(torch.finfo(dtype).eps), (float(ours_err), float(theirs_err))


def test_mambo_g_on_4d_latents_where_diffusers_guider_raises():
    """On (B, C, H, W) latents diffusers' guider raises; ours equals it on the same values packed as tokens."""
    cond, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with pytest.raises(RuntimeError, match="dim must be a 2-tuple"):
        MagnitudeAwareGuidance(guidance_scale=4.0).forward(cond, uncond)
    ours = MAMBOG(4.0).combine(context(0, 2, (4, 8, 8)), {COND: cond, UNCOND: uncond})
    packed = MagnitudeAwareGuidance(guidance_scale=4.0).forward(cond.flatten(2).mT, uncond.flatten(2).mT).pred
    assert max_rel(ours, packed.mT.reshape(cond.shape)) <= 1e-6


def test_fdg_level_at_scale_1_where_diffusers_guider_picks_the_wrong_level():
    """diffusers 0.42.1's FDG appends the previous level's conditional prediction for a level it skips (scale 1),
    so the rebuild fails on mismatched sizes; ours keeps that level's own, which is the limit of a scale -> 1."""
    ctx = context(0, 2, (4, 16, 16))
    g = torch.Generator().manual_seed(3)
    preds = {COND: torch.randn(2, 4, 16, 16, generator=g), UNCOND: torch.randn(2, 4, 16, 16, generator=g)}
    with pytest.raises(RuntimeError, match="must match the size"):
        FrequencyDecoupledGuidance(guidance_scales=[4.0, 1.0]).forward(preds[COND], preds[UNCOND])
    near = FrequencyDecoupledGuidance(guidance_scales=[4.0, 1.0 + 1e-7]).forward(preds[COND], preds[UNCOND]).pred
    assert max_rel(guidance.FDG([4.0, 1.0]).combine(ctx, preds), near) <= 1e-6


def test_zero_init_steps_skip_the_unconditional_pass():
    ctx = context(0, 2, (4, 4, 4))
    rule = CFGZeroStar(3.0, zero_init_steps=2)
    assert not rule.branches(ctx)[UNCOND].any()
    assert rule.branches(context(2, 2, (4, 4, 4)))[UNCOND].all()
    assert not CFGZeroStar(1.0).branches(context(3, 2, (4, 4, 4)))[UNCOND].any()  # w = 1: the conditional model


@pytest.mark.parametrize("make, message", [
    (lambda: CFGZeroStar(zero_init_steps=-1), r"CFGZeroStar: zero_init_steps=-1 is invalid; allowed: an integer >= 0"),
    (lambda: CFGZeroStar(zero_init_steps=1.5), r"zero_init_steps=1.5 is invalid"),
    (lambda: MAMBOG(alpha=-1.0), r"MAMBOG: alpha=-1.0 is out of range; allowed: a finite number in \[0, inf\)"),
    (lambda: APGMix(apg_start_step=-2), r"APGMix: apg_start_step=-2 is invalid"),
    (lambda: APGMix(momentum=2.0), r"APG: momentum=2.0 is out of range"),
    (lambda: TCFG(scale=float("nan")), r"TCFG: scale=nan is invalid"),
    (lambda: guidance.FDG([3.0]), r"FDG: scales=\[3.0\] has one level, which is CFG"),
    (lambda: guidance.FDG([3.0, 2.0], parallel_weights=[1.0, 0.5, 0.2]), r"FDG: parallel_weights=.* one number per "
                                                                         r"pyramid level \(2\)"),
    (lambda: guidance.FDG([3.0, "a"]), r"FDG: scales\[1\]='a' is invalid"),
])
def test_bad_settings_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("name", sorted(RULES))
def test_configs_round_trip(name):
    rule = RULES[name](4.0)[0]
    again = guidance.from_config(rule.to_config())
    assert type(again) is type(rule) and again.to_config() == rule.to_config()
    assert type(rule).__name__ in guidance.REGISTRY


# --------------------------------------------------------------------------------------------- in pipelines

PIPELINE_RULES = ["CFGZeroStar", "TCFG", "MAMBOG", "APGMix", "FDG"]


@pytest.fixture(scope="module")
def embedded():
    return load_embedded("cpu").pipe


def generate(pipe, kwargs: dict, rule: GuidanceStrategy) -> tuple[torch.Tensor, torch.Tensor]:
    with apply_guidance(pipe, rule) as handle:
        out = pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]
    return out, handle.nfe


def pipeline_case(name: str, embedded) -> tuple[object, dict, float]:
    if name == "embedded":
        return embedded, dict(class_labels=[0, 3, 7], num_inference_steps=STEPS, output_type="pt"), 3.0
    pipe = tp.build(name)
    scale = 4.0
    kwargs = tp.call_kwargs(name, num_inference_steps=STEPS)
    kwargs["true_cfg_scale" if name == "flux" else "guidance_scale"] = scale
    return pipe, kwargs, scale


@pytest.mark.parametrize("where", ["sd", "flux", "embedded"])
@pytest.mark.parametrize("name", PIPELINE_RULES)
def test_through_the_hook_equals_the_guider_in_the_same_pipeline(name, where, embedded):
    """SD: one batched call per step; Flux: sequential true CFG (flow); the embedded class-conditional model."""
    pipe, kwargs, scale = pipeline_case(where, embedded)
    ours, theirs = RULES[name](scale)
    if name == "FDG" and where == "flux":  # packed token latents: no spatial pyramid
        with apply_guidance(pipe, ours), pytest.raises(ValueError, match=r"FDG: the Laplacian pyramid needs"):
            pipe(**kwargs, generator=torch.Generator().manual_seed(0))
        return
    out, nfe = generate(pipe, kwargs, ours)
    ref, _ = generate(pipe, kwargs, GuiderRule(theirs))
    assert torch.isfinite(out).all()
    assert max_rel(out, ref) <= 1e-5, max_rel(out, ref)
    zeroed = ours.zero_init_steps if isinstance(ours, CFGZeroStar) else 0
    assert nfe.tolist() == [2 * STEPS - zeroed] * nfe.shape[0]  # CFG-Zero*'s zeroed steps skip the uncond pass
    plain, _ = generate(pipe, kwargs, guidance.CFG(scale))
    assert max_rel(out, plain) > 1e-4, "the rule must differ from CFG here (not a vacuous equality)"


def test_composes_with_interval_and_schedules(embedded):
    pipe, kwargs, _ = pipeline_case("embedded", embedded)
    out, nfe = generate(pipe, kwargs, Interval(TCFG(guidance.Schedule("linear", 5.0, 2.0)), start=0.0, stop=0.5))
    assert torch.isfinite(out).all() and nfe.tolist() == [STEPS + STEPS // 2] * 3


# ----------------------------------------------------------------------------------- dynamic thresholding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_threshold_equals_diffusers_schedulers(dtype):
    """Our percentile clip of x0 is diffusers' DDPM / DDIM `_threshold_sample` (thresholding=True)."""
    from diffusers import DDPMScheduler

    from guidance.dynamic_thresholding import threshold_x0

    x0 = (torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.7).to(dtype)
    scheduler = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    expected = scheduler._threshold_sample(x0)
    ours = threshold_x0(x0, 0.9, 1.5)
    assert ours.dtype == dtype and torch.equal(ours, expected)
    assert not torch.equal(ours, x0.clamp(-1, 1))  # s > 1 here: not plain clipping


def test_dynamic_thresholding_in_the_pipeline_equals_the_schedulers_own():
    """Embedded model, DDPM: CFG with the scheduler's own thresholding (thresholding=True) is our
    DynamicThresholding(CFG()) with the scheduler's turned off, on the same seeds (DDPM's posterior mean uses the
    thresholded x0, which our prediction encodes)."""
    from diffusers import DDPMScheduler

    model = load_embedded("cpu", scheduler="DDPMScheduler")
    pipe = model.pipe
    kwargs = dict(class_labels=[0, 3, 7], num_inference_steps=STEPS, output_type="pt", guidance_scale=9.0)
    config = dict(pipe.scheduler.config)
    pipe.scheduler = DDPMScheduler.from_config(config, thresholding=True, dynamic_thresholding_ratio=0.9,
                                               sample_max_value=2.0)
    native = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.scheduler = DDPMScheduler.from_config(config, thresholding=False, clip_sample=False)
    plain = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    ours, nfe = generate(pipe, kwargs, guidance.DynamicThresholding(guidance.CFG(), percentile=0.9, max_value=2.0))
    assert max_rel(ours, native) <= 1e-4, max_rel(ours, native)
    assert max_rel(plain, native) > 1e-2  # thresholding matters at w = 9
    assert nfe.tolist() == [2 * STEPS] * 3
    again = guidance.from_config(guidance.DynamicThresholding(guidance.CFG(), 0.9, 2.0).to_config())
    assert again.percentile == 0.9 and again.max_value == 2.0 and isinstance(again.inner, guidance.CFG)


# ------------------------------------------------------------------------------------------------- CFG++


@torch.no_grad()
def cfg_pp_loop(model, scheduler_name: str, labels: list[int], lam: float, steps: int) -> torch.Tensor:
    """CFG++ written from the paper's update (x_next = x0_lambda re-noised with eps_u), in the scheduler's own
    space, calling the embedded UNet directly: DDIM in VP form, Euler in VE form (x_next = x0 + sigma' eps)."""
    pipe = model.pipe
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    labels_t = torch.tensor(labels)
    gens = torch.Generator().manual_seed(0)
    shape = (len(labels), pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    from diffusers.utils.torch_utils import randn_tensor

    x = randn_tensor(shape, generator=gens) * sched.init_noise_sigma
    null = torch.full_like(labels_t, pipe.null_class)
    for i, t in enumerate(sched.timesteps):
        # the model input by hand: Euler's scale_model_input counts steps through step(), not called here
        inp = x if scheduler_name == "DDIMScheduler" else x / (sched.sigmas[i] ** 2 + 1) ** 0.5
        eps_c = pipe.unet(inp, t, class_labels=labels_t).sample.double()
        eps_u = pipe.unet(inp, t, class_labels=null).sample.double()
        eps_l = eps_u + lam * (eps_c - eps_u)
        if scheduler_name == "DDIMScheduler":
            abar = sched.alphas_cumprod[int(t)].double()
            prev = int(t) - sched.config.num_train_timesteps // steps
            abar_prev = sched.alphas_cumprod[prev].double() if prev >= 0 else sched.final_alpha_cumprod.double()
            x0 = (x - (1 - abar).sqrt() * eps_l) / abar.sqrt()
            x = (abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps_u).float()
        else:  # Euler on the VE sample: x = x0 + sigma eps
            sigma, sigma_next = sched.sigmas[i].double(), sched.sigmas[i + 1].double()
            x0 = x - sigma * eps_l
            x = (x0 + sigma_next * eps_u).float()
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_cfg_pp_equals_an_independent_cfg_pp_loop(scheduler):
    from diffusers import DDIMScheduler

    model = load_embedded("cpu", scheduler=scheduler)
    if scheduler == "DDIMScheduler":  # the embedded DDIM clips x0, which CFG++ refuses (see the test below)
        model.pipe.scheduler = DDIMScheduler.from_config(model.pipe.scheduler.config, clip_sample=False)
    labels, lam, steps = [0, 3, 7], 0.7, 6
    expected = cfg_pp_loop(model, scheduler, labels, lam, steps)
    with apply_guidance(model.pipe, guidance.CFGPlusPlus(lam)) as handle:
        ours = model.pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=3.0, output_type="pt",
                          generator=torch.Generator().manual_seed(0)).images
    assert max_rel(ours, expected) <= 1e-4, max_rel(ours, expected)
    assert handle.nfe.tolist() == [2 * steps] * 3
    cfg = model.pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=3.0, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
    assert max_rel(ours, cfg) > 1e-2


def test_cfg_pp_on_flow_lands_on_the_cfg_pp_update_from_s_1():
    """FlowMatch Euler steps x' = x + (s' - s) v; with our v the step equals (1 - s') x0_lambda + s' eps_u, also at
    the first step of a flow schedule (s = 1, where x0 = x - v and eps = x)."""
    g = torch.Generator().manual_seed(0)
    x, c, u = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    lam = 0.6
    for s, s_next in [(1.0, 0.8), (0.5, 0.3), (0.2, 0.0)]:
        full = lambda v: torch.full((2, 1, 1, 1), v, dtype=torch.float64)  # noqa: E731
        ctx = StepContext(0, 5, 1000.0 * s, Parametrization("flow", x, full(1 - s), full(s)),
                          next_sigma=s_next / (1 - s_next))
        v = guidance.CFGPlusPlus(lam).combine(ctx, {COND: c, UNCOND: u})
        x0_lam = x - s * (u + lam * (c - u))
        eps_u = x + (1 - s) * u  # flow: eps = x0 + v, x0 = x - s v
        assert torch.allclose(x + (s_next - s) * v, (1 - s_next) * x0_lam + s_next * eps_u, atol=1e-12)


def test_cfg_pp_refuses_solvers_it_cannot_steer():
    model = load_embedded("cpu", scheduler="DPMSolverMultistepScheduler")
    with apply_guidance(model.pipe, guidance.CFGPlusPlus(0.5)):
        with pytest.raises(ValueError, match="scheduler=DPMSolverMultistepScheduler does not step"):
            model.pipe(class_labels=[0], num_inference_steps=3, output_type="pt")
    model = load_embedded("cpu")  # DDIM with clip_sample=True
    with apply_guidance(model.pipe, guidance.CFGPlusPlus(0.5)):
        with pytest.raises(ValueError, match="clips the x0 of the prediction it is given"):
            model.pipe(class_labels=[0], num_inference_steps=3, output_type="pt")
        with pytest.raises(ValueError, match="DDIM with eta=0.5 adds noise"):
            model.pipe(class_labels=[0], num_inference_steps=3, output_type="pt", eta=0.5)
    with pytest.raises(ValueError, match="scale=None would take the call's CFG scale"):
        guidance.CFGPlusPlus(None)
