"""Multi-evaluation solvers (Heun, KDPM2): one guidance decision per scheduler step.

A two-stage solver evaluates the model twice per scheduler step (a predictor at sigma_i, then a
corrector at sigma_{i+1} or an interpolated sigma), 2N - 1 evaluations for N steps. Per-step state
(APG momentum, the AG switch, LinearAG's plan, Interval's window, EluCD's classifier step) must
advance once per scheduler step, never on the corrector.
"""

import copy

import pytest
import torch
from test_strategies import make_ctx, random_preds
from tiny_pipelines import build, call_kwargs
from torch import nn

from guidance import APG, CFG, AdaptiveGuidance, CalibratedClassifierGuidance, Interval, LinearAG, default_plan
from pipelines import apply_guidance

SOLVERS = ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler"]
STEPS = 3
EVALS = 2 * STEPS - 1


@pytest.fixture(scope="module")
def pipes():
    return {name: build("sd", name) for name in SOLVERS}


def run(pipe, strategy, **kw):
    with apply_guidance(pipe, strategy) as handle:
        images = pipe(**call_kwargs("sd", num_inference_steps=STEPS, **kw),
                      generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(images).all()
    return images, handle.nfe.tolist()


class Recorder(CFG):
    def reset(self):
        self.seen = []

    def combine(self, ctx, preds):
        self.seen.append((ctx.step, ctx.scheduler_step, ctx.starts_step, ctx.num_steps, ctx.num_scheduler_steps))
        return super().combine(ctx, preds)


@pytest.mark.parametrize("solver", SOLVERS)
def test_step_context_knows_the_scheduler_step(pipes, solver):
    recorder = Recorder()
    run(pipes[solver], recorder)
    assert [s[2] for s in recorder.seen] == [True, False, True, False, True]
    assert [s[1] for s in recorder.seen] == [0, 0, 1, 1, 2]
    assert {s[3:] for s in recorder.seen} == {(EVALS, STEPS)}
    ddim = Recorder()
    run(build("sd"), ddim)
    assert [(s[0], s[1], s[2]) for s in ddim.seen] == [(k, k, True) for k in range(STEPS)]


def at(step, scheduler_step, starts, seed):
    ctx = make_ctx(step=step, num_steps=EVALS, seed=seed)
    ctx.scheduler_step, ctx.num_scheduler_steps, ctx.starts_step = scheduler_step, STEPS, starts
    return ctx, random_preds(seed=100 + seed)


def test_apg_momentum_advances_once_per_scheduler_step():
    apg, predictors_only = APG(scale=5.0, eta=0.3, norm_threshold=4.0, momentum=-0.6), APG(scale=5.0, eta=0.3,
                                                                                           norm_threshold=4.0,
                                                                                           momentum=-0.6)
    for s in range(STEPS):
        ctx, p = at(2 * s, s, True, seed=2 * s)
        before = copy.deepcopy(predictors_only)
        torch.testing.assert_close(apg.combine(ctx, p), predictors_only.combine(ctx, p), rtol=0, atol=0)
        ctx, q = at(2 * s + 1, s, False, seed=2 * s + 1)
        ctx_as_first = copy.copy(ctx)
        ctx_as_first.starts_step = True
        # The corrector sees the momentum of the steps before, as its predictor did.
        torch.testing.assert_close(apg.combine(ctx, q), before.combine(ctx_as_first, q), rtol=0, atol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_adaptive_guidance_never_splits_a_step(pipes, solver):
    # threshold -1: every sample switches at scheduler step 0; "next" keeps that whole step guided.
    ag = AdaptiveGuidance(threshold=-1.0)
    _, nfe = run(pipes[solver], ag)
    assert nfe == [EVALS + 2] * 2  # predictor and corrector of step 0 guided, every later evaluation not
    assert ag.switch_step.tolist() == [0, 0]
    same = AdaptiveGuidance(threshold=-1.0, switch="same")
    _, nfe = run(pipes[solver], same)
    assert nfe == [EVALS + 1] * 2  # guided predictor measured, then conditional from there on


@pytest.mark.parametrize("solver", SOLVERS)
def test_interval_window_is_in_scheduler_steps(pipes, solver):
    _, nfe = run(pipes[solver], Interval(CFG(), start=0.0, stop=0.7))  # steps 0 and 1 of 3: four evaluations
    assert nfe == [EVALS + 4] * 2


def test_linear_ag_plan_is_one_kind_per_scheduler_step(pipes):
    assert default_plan(EVALS, evaluations_per_step=2) == ["cfg", "cfg", "estimate", "estimate", "cond"]
    _, nfe = run(pipes["HeunDiscreteScheduler"], LinearAG.unfitted(EVALS, evaluations_per_step=2))
    assert nfe == [2 + 2 + 1 + 1 + 1] * 2
    mixed = LinearAG.unfitted(EVALS)  # per-evaluation plan: cfg predictor, estimate corrector
    with pytest.raises(ValueError, match="second evaluation of scheduler step 0 .* allowed: one kind per scheduler"):
        run(pipes["HeunDiscreteScheduler"], mixed)


class CountingClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("solver", SOLVERS)
def test_elucd_guides_the_first_order_evaluation_only(pipes, solver):
    clf = CountingClassifier()
    clf(torch.zeros(1, 3, 32, 32))  # materialise the lazy layer
    clf.calls = 0
    strategy = CalibratedClassifierGuidance(clf, scale=0.5, target=[1, 2], softplus_beta=None)
    run(pipes[solver], strategy)
    assert clf.calls == STEPS
    ctx, p = at(1, 0, False, seed=0)
    torch.testing.assert_close(strategy.combine(ctx, p), CFG().combine(ctx, p), rtol=0, atol=0)
