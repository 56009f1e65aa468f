"""Strategies on random tensors: the paper equations, diffusers' guiders, configs and validation."""

import json

import numpy as np
import pytest
import torch

import guidance
from guidance import (APG, CFG, COND, UNCOND, AdaptiveGuidance, Interval, Parametrization, Rescale, Schedule,
                      StepContext, guided_prediction)


def make_ctx(batch=3, shape=(4, 8, 8), step=0, num_steps=10, scale=5.0, kind="epsilon", seed=0, rescale=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + shape, generator=g)
    abar = torch.rand(batch, generator=g).clamp(0.05, 0.95).double().view(-1, *[1] * len(shape))
    param = Parametrization(kind, x, abar.sqrt(), (1 - abar).sqrt())
    return StepContext(step, num_steps, 500.0, param, scale, rescale)


def random_preds(batch=3, shape=(4, 8, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    return {COND: torch.randn((batch,) + shape, generator=g), UNCOND: torch.randn((batch,) + shape, generator=g)}


def apg_reference(cond_x0_steps, uncond_x0_steps, w, eta, r, beta):
    """Independent float64 NumPy implementation of APG Algorithm 1 over a sequence of steps."""
    out, avg = [], None
    for dc, du in zip(cond_x0_steps, uncond_x0_steps):
        dc, du = dc.astype(np.float64), du.astype(np.float64)
        res = np.empty_like(dc)
        if avg is None:
            avg = np.zeros_like(dc)
        for i in range(dc.shape[0]):
            diff = dc[i] - du[i]
            if beta != 0:
                avg[i] = diff + beta * avg[i]
                diff = avg[i]
            if r > 0:
                diff = diff * min(1.0, r / np.linalg.norm(diff.ravel()))
            unit = dc[i] / np.linalg.norm(dc[i].ravel())
            par = np.sum(diff * unit) * unit
            res[i] = dc[i] + (w - 1) * ((diff - par) + eta * par)
        out.append(res)
    return out


def test_cfg_is_the_ho_salimans_formula():
    ctx, p = make_ctx(), random_preds()
    out = CFG().combine(ctx, p)
    torch.testing.assert_close(out, p[UNCOND] + 5.0 * (p[COND] - p[UNCOND]), rtol=0, atol=0)


def test_cfg_rescale_matches_diffusers():
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    ctx, p = make_ctx(), random_preds()
    out = CFG(scale=7.0, guidance_rescale=0.7).combine(ctx, p)
    ref = rescale_noise_cfg(p[UNCOND] + 7.0 * (p[COND] - p[UNCOND]), p[COND], 0.7)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # None takes the call's own guidance_rescale, which the caller applies after the rule (as the pipeline does).
    torch.testing.assert_close(guided_prediction(CFG(scale=7.0), make_ctx(rescale=0.7), p), ref, rtol=0, atol=1e-6)
    # An explicit phi replaces the call's instead of adding to it.
    torch.testing.assert_close(guided_prediction(CFG(scale=7.0, guidance_rescale=0.7), make_ctx(rescale=0.3), p), ref,
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_the_call_rescale_holds_for_every_rule(kind):
    """APG(eta=1, r=0, beta=0) is CFG, so with the call's guidance_rescale it must equal CFG rescaled; wrappers
    (Interval, AdaptiveGuidance) keep it, and Rescale's own phi replaces it."""
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    ctx, p = make_ctx(kind=kind, rescale=0.7), random_preds()
    ref = rescale_noise_cfg(p[UNCOND] + 5.0 * (p[COND] - p[UNCOND]), p[COND], 0.7)
    apg = APG(eta=1.0, norm_threshold=0.0, momentum=0.0)
    for rule in (apg, Interval(apg, 0.0, 1.0), AdaptiveGuidance(apg, threshold=1.0), CFG()):
        rule.reset()
        torch.testing.assert_close(guided_prediction(rule, ctx, p), ref, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(rule.combine(ctx, p), ref, rtol=1e-3, atol=1e-3)  # combine alone does not rescale
    own = guided_prediction(Rescale(CFG(), phi=0.3), ctx, p)
    torch.testing.assert_close(own, rescale_noise_cfg(p[UNCOND] + 5.0 * (p[COND] - p[UNCOND]), p[COND], 0.3))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow", "sample"])
def test_apg_with_eta1_r0_beta0_is_cfg(kind):
    ctx, p = make_ctx(kind=kind), random_preds()
    apg = APG(eta=1.0, norm_threshold=0.0, momentum=0.0)
    torch.testing.assert_close(apg.combine(ctx, p), CFG().combine(ctx, p), rtol=1e-4, atol=1e-4)


def test_apg_matches_independent_float64_paper_implementation_over_steps():
    apg = APG(scale=6.0, eta=0.3, norm_threshold=4.0, momentum=-0.6)
    cond_x0, uncond_x0, ours = [], [], []
    for step in range(5):
        ctx, p = make_ctx(step=step, seed=step), random_preds(seed=10 + step)
        ours.append(ctx.to_x0(apg.combine(ctx, p)).numpy())
        cond_x0.append(ctx.to_x0(p[COND]).numpy())
        uncond_x0.append(ctx.to_x0(p[UNCOND]).numpy())
    ref = apg_reference(cond_x0, uncond_x0, w=6.0, eta=0.3, r=4.0, beta=-0.6)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4)


def test_apg_norm_threshold_really_clips():
    # r small enough to bind: the guidance update has norm (w - 1) * r at most.
    ctx, p = make_ctx(kind="sample"), random_preds()
    apg = APG(scale=3.0, eta=1.0, norm_threshold=0.5, momentum=0.0)
    update = apg.combine(ctx, p) - p[COND]
    norms = update.flatten(1).norm(dim=1)
    assert torch.all(norms <= 2.0 * 0.5 + 1e-4) and torch.all(norms > 0.9)


@pytest.mark.parametrize("original", [False, True])
def test_apg_diffusers_mode_matches_diffusers_guider(original):
    from diffusers.guiders import AdaptiveProjectedGuidance
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

    scale = 4.0 if not original else 3.0
    ref = AdaptiveProjectedGuidance(
        guidance_scale=scale, adaptive_projected_guidance_momentum=-0.5, adaptive_projected_guidance_rescale=10.0,
        eta=0.4, use_original_formulation=original,
    )
    ours = APG(scale=scale, eta=0.4, norm_threshold=10.0, momentum=-0.5, mode="diffusers",
               use_original_formulation=original)
    for step in range(4):
        ctx, p = make_ctx(step=step, seed=step), random_preds(seed=20 + step)
        ref.set_state(step=step, num_inference_steps=4, timestep=torch.tensor(999 - step))
        if step == 0:
            ref.momentum_buffer = MomentumBuffer(-0.5)  # what diffusers' prepare_inputs does at step 0
        expected = ref.forward(p[COND], p[UNCOND]).pred
        torch.testing.assert_close(ours.combine(ctx, p), expected, rtol=0, atol=1e-6)


def test_apg_batch_equals_samples_run_alone():
    def run(rows):
        apg = APG(scale=5.0, eta=0.2, norm_threshold=3.0, momentum=-0.75)
        outs = []
        for step in range(4):
            ctx, p = make_ctx(step=step, seed=step), random_preds(seed=30 + step)
            sub = StepContext(step, 4, 500.0, ctx.param.select(rows), 5.0)
            outs.append(apg.combine(sub, {k: v[rows] for k, v in p.items()}))
        return torch.cat(outs)

    batch = run(torch.tensor([0, 1, 2]))
    alone = [run(torch.tensor([i])) for i in range(3)]
    for i in range(3):
        torch.testing.assert_close(batch.view(4, 3, -1)[:, i], alone[i].view(4, -1), rtol=0, atol=1e-6)


def test_apg_reset_clears_momentum():
    apg = APG(scale=5.0, momentum=-0.5)
    ctx, p = make_ctx(), random_preds()
    first = apg.combine(ctx, p)
    apg.combine(ctx, p)
    apg.reset()
    torch.testing.assert_close(apg.combine(ctx, p), first, rtol=0, atol=0)


def test_scale_none_list_callable_and_schedule():
    p = random_preds()
    for step, expected in [(0, 9.0), (3, 2.0)]:
        ctx = make_ctx(step=step, num_steps=4, scale=5.0)
        want = CFG(scale=expected).combine(ctx, p)
        torch.testing.assert_close(CFG(scale=[9.0, 8.0, 3.0, 2.0]).combine(ctx, p), want)
        torch.testing.assert_close(CFG(scale=Schedule("linear", 9.0, 2.0)).combine(ctx, p), want)
        torch.testing.assert_close(CFG(scale=lambda c: expected).combine(ctx, p), want)
    torch.testing.assert_close(CFG().combine(make_ctx(scale=5.0), p), CFG(scale=5.0).combine(make_ctx(), p))
    with pytest.raises(ValueError, match="scale has 2 entries"):
        CFG(scale=[1.0, 2.0]).combine(make_ctx(num_steps=4), p)


def test_interval_on_steps_and_sigma_skips_uncond_outside():
    p = random_preds()
    inner = CFG()
    s = Interval(inner, start=0.2, stop=0.6)
    on = [bool(s.branches(make_ctx(step=k, num_steps=10))[UNCOND].all()) for k in range(10)]
    assert on == [False, False, True, True, True, True, False, False, False, False]
    torch.testing.assert_close(s.combine(make_ctx(step=0), p), p[COND])
    torch.testing.assert_close(s.combine(make_ctx(step=3), p), inner.combine(make_ctx(step=3), p))
    ctx = make_ctx()
    sigma = ctx.sigma
    lo, hi = float(sigma.min()), float(sigma.max())
    mask = Interval(CFG(), sigma_min=lo, sigma_max=hi).branches(ctx)[UNCOND]
    assert mask.tolist() == [(lo < v <= hi) for v in sigma.tolist()]


def test_rescale_wrapper_equals_cfg_guidance_rescale():
    ctx, p = make_ctx(), random_preds()
    torch.testing.assert_close(Rescale(CFG(), phi=0.5).combine(ctx, p), CFG(guidance_rescale=0.5).combine(ctx, p))


@pytest.mark.parametrize("strategy", [
    CFG(), CFG(scale=3.5, guidance_rescale=0.7), CFG(scale=[1.0, 2.0]), CFG(scale=Schedule("cosine", 8, 2)),
    APG(), APG(scale=4.0, eta=1.0, norm_threshold=0, momentum=0), APG(mode="diffusers", use_original_formulation=True),
    Interval(APG(scale=7.0), start=0.1, stop=0.8), Interval(CFG(), sigma_min=0.3, sigma_max=5.0),
    Rescale(Interval(APG()), phi=0.3),
])
def test_config_round_trip(strategy):
    config = strategy.to_config()
    text = json.dumps(config)
    rebuilt = guidance.from_config(text)
    assert rebuilt.to_config() == config
    ctx, p = make_ctx(num_steps=2), random_preds()
    torch.testing.assert_close(rebuilt.combine(ctx, p), strategy.combine(ctx, p))


def test_callable_scale_refuses_to_serialise():
    with pytest.raises(ValueError, match="callable"):
        CFG(scale=lambda ctx: 3.0).to_config()


@pytest.mark.parametrize("make, match", [
    (lambda: APG(eta=-1), r"APG: eta=-1 is out of range; allowed: a finite number in \[0, inf\)"),
    (lambda: APG(momentum=2), r"APG: momentum=2 is out of range; allowed: .*\[-1, 1\]"),
    (lambda: APG(norm_threshold=float("nan")), r"APG: norm_threshold=nan is invalid"),
    (lambda: APG(mode="comfy"), r"APG: mode='comfy' is unknown; allowed: paper, diffusers"),
    (lambda: CFG(scale="high"), r"CFG: scale='high' is invalid"),
    (lambda: CFG(guidance_rescale=1.5), r"CFG: guidance_rescale=1.5 is out of range; allowed: .*\[0, 1\]"),
    (lambda: CFG(scale=[]), r"CFG: scale=\[\] is empty"),
    (lambda: Interval(CFG(), start=0.8, stop=0.2), r"Interval: stop=0.2 is not above start=0.8"),
    (lambda: Interval(CFG(), start=1.5), r"Interval: start=1.5 is out of range"),
    (lambda: Interval("cfg"), r"Interval: inner='cfg' is not a guidance strategy"),
    (lambda: Rescale(CFG(), phi=-0.1), r"Rescale: phi=-0.1 is out of range"),
    (lambda: Schedule("exp", 1, 2), r"Schedule: kind='exp' is unknown"),
    (lambda: guidance.from_config({"name": "Nope"}), r"name='Nope' is not a known strategy"),
    (lambda: guidance.from_config({"name": "APG", "params": {"etta": 1}}), r"invalid params \['etta'\]"),
    (lambda: guidance.from_config("{not json"), r"is not valid JSON"),
])
def test_invalid_parameters_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow", "sample"])
def test_parametrization_round_trip(kind):
    ctx, p = make_ctx(kind=kind), random_preds()
    if kind == "flow":
        ctx.param.alpha = 1 - ctx.param.sigma
    torch.testing.assert_close(ctx.from_x0(ctx.to_x0(p[COND])), p[COND], rtol=1e-4, atol=1e-4)
    # eps recovered from x0 reproduces the model input: x = alpha x0 + sigma eps.
    x0 = ctx.to_x0(p[COND]).double()
    eps = ctx.param.to_eps(p[COND]).double()
    torch.testing.assert_close(ctx.param.alpha * x0 + ctx.param.sigma * eps, ctx.x.double(), rtol=1e-4, atol=1e-4)
    # from_eps inverts to_eps (LinearAG's estimate goes back to the model's space this way).
    torch.testing.assert_close(ctx.param.from_eps(ctx.param.to_eps(p[COND])), p[COND], rtol=1e-4, atol=1e-4)
