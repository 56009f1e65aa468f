"""Adaptive Guidance: per-sample sticky switch to the conditional model, with real NFE savings."""

import pytest
import torch
from test_hook import batch_and_alone, count_rows, run
from test_strategies import make_ctx, random_preds
from tiny_pipelines import PIPELINE_NAMES, build, call_kwargs, denoiser

from guidance import APG, CFG, COND, UNCOND, AdaptiveGuidance
from pipelines import apply_guidance


def test_threshold_one_on_distinct_predictions_is_the_inner_strategy_exactly():
    ag = AdaptiveGuidance(CFG(), threshold=1.0)
    for step in range(3):
        ctx, p = make_ctx(step=step), random_preds(seed=step)
        assert bool(ag.branches(ctx)[UNCOND].all())
        torch.testing.assert_close(ag.combine(ctx, p), CFG().combine(ctx, p), rtol=0, atol=0)


def test_switch_is_per_sample_and_sticky():
    ctx = make_ctx(batch=3)
    p = random_preds(batch=3)
    p[UNCOND][1] = p[COND][1] * 1.001  # sample 1 agrees (cos ~ 1), the others do not
    for switch, first_uses_cond in (("next", False), ("same", True)):
        ctx = make_ctx(batch=3)
        ag = AdaptiveGuidance(CFG(), threshold=0.99, similarity_space="model", switch=switch)
        assert ag.branches(ctx)[UNCOND].tolist() == [True, True, True]
        out = ag.combine(ctx, p)
        assert torch.equal(out[1], p[COND][1]) == first_uses_cond
        torch.testing.assert_close(out[0], CFG().combine(ctx, p)[0])
        ctx = make_ctx(batch=3, step=1)  # the switch takes effect from the next scheduler step
        assert ag.branches(ctx)[UNCOND].tolist() == [True, False, True]
        ctx.evaluated = {COND: ctx.all(), UNCOND: torch.tensor([True, False, True])}
        q = {COND: p[COND], UNCOND: p[UNCOND].clone()}
        q[UNCOND][1] = float("nan")
        out2 = ag.combine(ctx, q)
        assert torch.equal(out2[1], q[COND][1]) and torch.isfinite(out2).all()
        assert ag.switch_step.tolist() == [-1, 0, -1]


@pytest.mark.parametrize("name", ["sd", "dit", "flux", "pixart_alpha"])
def test_nfe_savings_are_real_and_counted(name):
    pipe = build(name)
    counter = count_rows(denoiser(pipe))
    with apply_guidance(pipe, AdaptiveGuidance(threshold=-1.0)) as handle:  # switches after step 0
        images = run(pipe, name)
    steps = call_kwargs(name)["num_inference_steps"]
    assert handle.nfe.tolist() == [steps + 1] * 2
    assert counter["rows"] == int(handle.nfe.sum())
    assert torch.isfinite(images).all()


def test_batch_equals_samples_alone_in_a_pipeline():
    strategy = AdaptiveGuidance(APG(), threshold=0.3, similarity_space="x0")
    both, alone, nfe_both, nfe_alone = batch_and_alone(build("sd"), strategy, num_inference_steps=4)
    assert nfe_both == nfe_alone
    assert (both - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("make, match", [
    (lambda: AdaptiveGuidance(similarity_space="v"), "similarity_space='v' is unknown"),
    (lambda: AdaptiveGuidance(switch="later"), "switch='later' is unknown"),
    (lambda: AdaptiveGuidance(threshold=float("inf")), "threshold=inf is invalid"),
    (lambda: AdaptiveGuidance(threshold=2), r"threshold=2 is out of range; allowed: a finite number in \[-1, 1\]"),
    (lambda: AdaptiveGuidance(threshold=-1.5), r"threshold=-1.5 is out of range"),
])
def test_invalid_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_every_pipeline_runs(tmp_path):
    for name in PIPELINE_NAMES:
        pipe = build(name)
        with apply_guidance(pipe, AdaptiveGuidance(threshold=0.5)):
            assert torch.isfinite(run(pipe, name)).all()


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_models_measure_similarity_where_it_carries_information(name):
    """At a flow model's first step (s = 1) x = eps, so eps_c = eps_u = x and the eps-space cosine is
    1 whatever the model says: every sample would stop guidance at step 0. "auto" measures the
    velocities instead; the tiny random models' branches differ little, hence the high threshold."""
    pipe = build(name)
    steps = 4
    kw = call_kwargs(name, num_inference_steps=steps)
    auto = AdaptiveGuidance(threshold=0.9999)  # the default similarity space
    with apply_guidance(pipe, auto) as handle:
        pipe(**kw, generator=torch.Generator().manual_seed(0))
    # Guidance runs past the first step (an eps-space cosine would stop every sample at step 0: steps + 1 NFE).
    assert auto.switch_step.tolist() != [0, 0] and all(n > steps + 1 for n in handle.nfe.tolist())
    first = auto.similarity_history[0]
    assert bool((first < 1 - 1e-5).all()) and first[0] != first[1]
    eps = AdaptiveGuidance(threshold=0.9999, similarity_space="eps")
    with apply_guidance(pipe, eps):
        pipe(**kw, generator=torch.Generator().manual_seed(0))
    assert bool((eps.similarity_history[0] >= 1 - 1e-6).all())  # no information at s = 1


def test_auto_is_the_papers_eps_on_epsilon_models():
    ctx, p = make_ctx(kind="epsilon"), random_preds()
    auto, eps = AdaptiveGuidance(), AdaptiveGuidance(similarity_space="eps")
    torch.testing.assert_close(auto.similarity(ctx, p[COND], p[UNCOND]), eps.similarity(ctx, p[COND], p[UNCOND]))
    ctx = make_ctx(kind="flow")
    model = AdaptiveGuidance(similarity_space="model")
    torch.testing.assert_close(auto.similarity(ctx, p[COND], p[UNCOND]), model.similarity(ctx, p[COND], p[UNCOND]))
