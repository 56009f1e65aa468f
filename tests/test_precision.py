"""Half precision: x0-space rules compute in float32 and only the returned prediction is cast.

Error of a run = max |result in the low dtype - result of the same inputs in float32|. Each
strategy's error must stay within 1.5x of native CFG's error in that dtype (CFG done in the low
dtype, as the pipelines do), on random tensors and on a tiny pipeline.
"""

import pytest
import torch
from test_strategies import make_ctx, random_preds
from tiny_pipelines import build, call_kwargs

from guidance import APG, CFG, COND, UNCOND, AdaptiveGuidance, CalibratedClassifierGuidance, Interval, LinearAG
from guidance.base import StepContext
from guidance.parametrization import Parametrization
from pipelines import apply_guidance

DTYPES = [torch.bfloat16, torch.float16]
KINDS = ["epsilon", "v_prediction", "flow"]


def low_and_full(kind, dtype, scale=7.5, step=0, num_steps=10, seed=0):
    """(ctx, preds) in `dtype`, and the same values upcast to float32 (the reference)."""
    # One noise level per sample for the whole run (as along a trajectory), new predictions per step.
    ctx, p = make_ctx(kind=kind, scale=scale, step=step, num_steps=num_steps), random_preds(seed=seed + 1)
    # Noise levels from SD's first step (alphabar 0.0047) to a late one: 1/alpha amplifies rounding.
    abar = torch.tensor([0.0047, 0.3, 0.95], dtype=torch.float64).view(-1, 1, 1, 1)
    ctx.param.alpha, ctx.param.sigma = abar.sqrt(), (1 - abar).sqrt()
    if kind == "flow":
        ctx.param.sigma = torch.tensor([0.97, 0.5, 0.05], dtype=torch.float64).view(-1, 1, 1, 1)
        ctx.param.alpha = 1 - ctx.param.sigma
    p = {k: v * 3 for k, v in p.items()}
    low_p = {k: v.to(dtype) for k, v in p.items()}
    full_p = {k: v.float() for k, v in low_p.items()}
    x = ctx.x.to(dtype)

    def ctx_for(x_):
        param = Parametrization(kind, x_, ctx.param.alpha, ctx.param.sigma)
        return StepContext(step, num_steps, 500.0, param, scale)

    return ctx_for(x), low_p, ctx_for(x.float()), full_p


def error(make, kind, dtype, steps=3):
    low_s, full_s, worst = make(), make(), 0.0
    for step in range(steps):
        lc, lp, fc, fp = low_and_full(kind, dtype, step=step, num_steps=steps, seed=step)
        low, full = low_s.combine(lc, lp), full_s.combine(fc, fp)
        assert low.dtype == dtype
        worst = max(worst, (low.float() - full).abs().max().item())
    return worst


def tiny_classifier():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10))


STRATEGIES = {
    "apg-as-cfg": lambda: APG(eta=1.0, norm_threshold=0.0, momentum=0.0),
    "apg": lambda: APG(norm_threshold=50.0, momentum=-0.5),
    "interval-apg": lambda: Interval(APG(norm_threshold=50.0), start=0.0, stop=1.0),
    "ag-apg": lambda: AdaptiveGuidance(APG(norm_threshold=50.0), threshold=1.0),
    "linear-ag": lambda: LinearAG.unfitted(3, plan=["cfg", "estimate", "estimate"]),
    "elucd": lambda: CalibratedClassifierGuidance(tiny_classifier(), scale=0.2, target=[1], step_rule="x0"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_strategies_in_half_precision_stay_within_native_cfgs_error(dtype, kind):
    native = error(CFG, kind, dtype)
    assert native > 0
    errors = {name: error(make, kind, dtype) for name, make in STRATEGIES.items()}
    assert all(e <= 1.5 * native for e in errors.values()), (native, {k: v for k, v in errors.items() if v > 1.5 * native})


@pytest.mark.parametrize("kind", ["v_prediction", "flow"])
def test_adaptive_similarity_is_measured_in_float32(kind):
    lc, lp, fc, fp = low_and_full(kind, torch.bfloat16)
    ag = AdaptiveGuidance(similarity_space="eps")
    low, full = ag.similarity(lc, lp[COND], lp[UNCOND]), ag.similarity(fc, fp[COND], fp[UNCOND])
    torch.testing.assert_close(low, full, rtol=0, atol=1e-6)


def test_apg_on_a_bf16_pipeline_stays_within_native_cfgs_error():
    pipe = build("sd")
    kw = call_kwargs("sd", num_inference_steps=1, output_type="latent")  # one step: before the fix 1.9x native

    def latents(dtype, strategy=None):
        pipe.to(dtype=dtype)
        if strategy is None:
            return pipe(**kw, generator=torch.Generator().manual_seed(0)).images.float()
        with apply_guidance(pipe, strategy):
            return pipe(**kw, generator=torch.Generator().manual_seed(0)).images.float()

    native = (latents(torch.bfloat16) - latents(torch.float32)).abs().max().item()
    for make in (lambda: APG(eta=1.0, norm_threshold=0.0, momentum=0.0), lambda: APG(norm_threshold=50.0)):
        err = (latents(torch.bfloat16, make()) - latents(torch.float32, make())).abs().max().item()
        assert err <= 1.5 * native, (err, native)
