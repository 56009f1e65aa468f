"""LinearAG: the least-squares fit, the estimate, NFE accounting, compatibility checks, save/load."""

import dataclasses
import json

import pytest
import torch
from test_hook import batch_and_alone, count_rows, run
from test_strategies import make_ctx, random_preds
from tiny_pipelines import PROMPTS, build, call_kwargs, denoiser

import guidance
from guidance import CFG, COND, UNCOND, LinearAG, LinearAGCoefficients, Rescale, default_plan, fit_linear_ag
from guidance.call import CallDescription
from guidance.linear_ag import history_terms
from pipelines import apply_guidance
from pipelines.linear_ag_fit import LinearAGRecorder, fit_pipeline, main

PLAN5 = ["cfg", "estimate", "cfg", "estimate", "cond"]  # step 3 regresses on step 1's estimate (lag 2)
WRONG_PIPELINE = r"pipeline='StableDiffusionPipeline' but this call has pipeline='DiTPipeline'"


@pytest.fixture(scope="module")
def fitted():
    """Coefficients fitted on the tiny SD pipeline: 4 trajectories of 5 DDIM steps."""
    torch.set_num_threads(1)
    return fit_pipeline(build("sd"), PROMPTS * 2, 5, 7.5, plan=PLAN5, batch_size=2, progress=False,
                        call_kwargs={"height": 32, "width": 32})


def synthetic(plan, history, intercept, n=6, shape=(2, 3, 3), seed=0):
    """Trajectories whose eps_u on estimate steps is an exact affine function of the history."""
    g = torch.Generator().manual_seed(seed)
    k_total = len(plan)
    eps_c = torch.randn(n, k_total, *shape, generator=g, dtype=torch.float64)
    eps_u = torch.randn(n, k_total, *shape, generator=g, dtype=torch.float64)
    cond_coef = torch.zeros(k_total, history + 1, dtype=torch.float64)
    uncond_coef, icpt = torch.zeros_like(cond_coef), torch.zeros(k_total, dtype=torch.float64)
    for k, kind in enumerate(plan):
        if kind != "estimate":
            continue
        value = torch.zeros_like(eps_u[:, k])
        for branch, lag in history_terms(plan, k, history):
            coef = float(torch.rand((), generator=g, dtype=torch.float64) * 2 - 1)
            (cond_coef if branch == COND else uncond_coef)[k, lag] = coef
            value += coef * (eps_c if branch == COND else eps_u)[:, k - lag]
        if intercept:
            icpt[k] = float(torch.rand((), generator=g, dtype=torch.float64) - 0.5)
            value += icpt[k]
        eps_u[:, k] = value
    return eps_c, eps_u, LinearAGCoefficients(plan, cond_coef, uncond_coef, icpt)


# --- the fit ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("plan, history, intercept", [
    (default_plan(8), 2, False), (default_plan(8), 2, True), (PLAN5, 1, False),
    (["cfg", "cfg", "estimate", "estimate", "cond", "estimate", "cfg", "estimate"], 1, True),
])
def test_fit_recovers_a_known_linear_relation(plan, history, intercept):
    eps_c, eps_u, truth = synthetic(plan, history, intercept)
    fit = fit_linear_ag(eps_c, eps_u, plan, history=history, intercept=intercept)
    assert fit.plan == plan and fit.history == history and fit.num_samples == 6
    for name in ("cond_coef", "uncond_coef", "intercept"):
        torch.testing.assert_close(getattr(fit, name), getattr(truth, name), rtol=0, atol=1e-6)
    assert all((r is None) == (p != "estimate") for r, p in zip(fit.r2, plan))
    assert all(abs(r - 1) < 1e-9 for r in fit.r2 + fit.delta_r2 if r is not None)


def test_collinear_history_still_fits_exactly():
    # With H = 3, step 1's estimate is a combination of regressors step 2 also has: the coefficients
    # are not identifiable, the minimum-norm solution reproduces the data all the same.
    plan = ["cfg", "estimate", "estimate", "cond", "estimate", "cfg", "estimate"]
    eps_c, eps_u, _ = synthetic(plan, 3, True)
    fit = fit_linear_ag(eps_c, eps_u, plan, history=3, intercept=True)
    assert all(abs(r - 1) < 1e-9 for r in fit.r2 + fit.delta_r2 if r is not None)


def test_default_plan_is_the_papers_25_nfe_at_20_steps():
    plan = default_plan(20)
    assert plan[:4] == ["cfg", "estimate", "cfg", "estimate"] and plan[10:] == ["cond"] * 10
    assert LinearAGCoefficients.unfitted(20).nfe == 25
    assert default_plan(5) == ["cfg", "estimate", "cfg", "cond", "cond"]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_estimate_step_is_inner_cfg_on_the_regressed_uncond_in_eps_space(kind):
    plan = ["cfg", "estimate"]
    cond_coef = torch.tensor([[0.0, 0.0, 0.0], [0.7, 0.2, 0.0]], dtype=torch.float64)
    uncond_coef = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.4, 0.0]], dtype=torch.float64)
    strategy = LinearAG(LinearAGCoefficients(plan, cond_coef, uncond_coef, torch.tensor([0.0, 0.1])))
    ctx0, ctx1 = make_ctx(step=0, num_steps=2, kind=kind), make_ctx(step=1, num_steps=2, kind=kind, seed=3)
    p0, p1 = random_preds(seed=1), random_preds(seed=2)
    assert strategy.branches(ctx0)[UNCOND].all() and not strategy.branches(ctx1)[UNCOND].any()
    torch.testing.assert_close(strategy.combine(ctx0, p0), CFG().combine(ctx0, p0), rtol=0, atol=0)
    eps = lambda ctx, p: ctx.param.to_eps(p)  # noqa: E731
    eps_u = 0.7 * eps(ctx1, p1[COND]) + 0.2 * eps(ctx0, p0[COND]) + 0.4 * eps(ctx0, p0[UNCOND]) + 0.1
    uncond = ctx1.param.from_eps(eps_u)
    ctx1.evaluated = {COND: ctx1.all(), UNCOND: ctx1.none()}
    nan_uncond = {COND: p1[COND], UNCOND: torch.full_like(p1[UNCOND], float("nan"))}
    expected = CFG().combine(ctx1, {COND: p1[COND], UNCOND: uncond})
    torch.testing.assert_close(strategy.combine(ctx1, nan_uncond), expected, rtol=1e-5, atol=1e-5)


# --- through the hook ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd", "dit", "flux"])
def test_all_cfg_plan_is_cfg_exactly(name):
    pipe = build(name)
    native = run(pipe, name)
    with apply_guidance(pipe, CFG()):
        cfg = run(pipe, name)
    with apply_guidance(pipe, LinearAG.unfitted(3, plan=["cfg"] * 3)) as handle:
        linear = run(pipe, name)
    assert torch.equal(linear, cfg)
    assert (linear - native).abs().max().item() <= 1e-5
    assert handle.nfe.tolist() == [6, 6]


@pytest.mark.parametrize("name", ["sd", "dit", "flux"])
def test_nfe_is_the_plans_count_and_the_rows_evaluated(name):
    pipe = build(name)
    counter = count_rows(denoiser(pipe))
    strategy = LinearAG.unfitted(3, plan=["cfg", "estimate", "cond"])
    with apply_guidance(pipe, strategy) as handle:
        images = run(pipe, name)
    assert handle.nfe.tolist() == [strategy.coefficients.nfe] * 2 == [4, 4]
    assert counter["rows"] == int(handle.nfe.sum())
    assert torch.isfinite(images).all()
    with apply_guidance(pipe, LinearAG.unfitted(3, plan=["cfg", "cond", "cond"])):
        cond_after_first = run(pipe, name)
    assert (images - cond_after_first).abs().max().item() > 1e-4  # the estimate step really guides


def test_fit_through_the_pipeline_records_provenance(fitted):
    c = fitted
    assert (c.pipeline, c.scheduler, c.num_inference_steps, c.guidance_scale) == (
        "StableDiffusionPipeline", "DDIMScheduler", 5, 7.5)
    assert c.prediction_type == "epsilon" and c.space == "eps" and c.num_samples == 4 and c.plan == PLAN5
    assert len(c.timesteps) == 5 and c.timesteps[0] > c.timesteps[-1]
    assert [r is None for r in c.r2] == [p != "estimate" for p in PLAN5]
    assert all(0.0 < r <= 1.0 for r in c.r2 if r is not None)
    assert [d is None for d in c.delta_r2] == [p != "estimate" for p in PLAN5]
    assert all(d <= 1.0 for d in c.delta_r2 if d is not None)


def test_recorder_is_cfg_and_records_every_step():
    pipe = build("sd")
    with apply_guidance(pipe, CFG()):
        cfg = run(pipe, "sd")
    recorder = LinearAGRecorder(space="model")
    with apply_guidance(pipe, recorder):
        assert torch.equal(run(pipe, "sd"), cfg)
        run(pipe, "sd", seed=1)
    eps_c, eps_u = recorder.trajectories()
    assert eps_c.shape[:2] == (4, 3) and eps_u.shape == eps_c.shape and recorder.timesteps is not None


def test_batch_equals_samples_alone(fitted):
    both, alone, nfe_both, nfe_alone = batch_and_alone(build("sd"), LinearAG(fitted), num_inference_steps=5)
    assert nfe_both == nfe_alone == [7, 7]
    assert (both - alone).abs().max().item() <= 1e-5


def test_save_load_and_config_round_trip(fitted, tmp_path):
    path = tmp_path / "sd.safetensors"
    fitted.save(path)
    loaded = LinearAGCoefficients.load(path)
    assert loaded.metadata() == fitted.metadata()
    for name in ("cond_coef", "uncond_coef", "intercept"):
        assert torch.equal(getattr(loaded, name), getattr(fitted, name))
    pipe = build("sd")
    kw = {"num_inference_steps": 5}
    with apply_guidance(pipe, LinearAG(fitted)):
        reference = run(pipe, "sd", **kw)
    config = json.dumps(LinearAG(fitted).to_config())
    for strategy in (LinearAG(str(path)), guidance.from_config(config),
                     guidance.from_config({"name": "LinearAG", "params": {"coefficients": str(path)}})):
        with apply_guidance(pipe, strategy):
            assert torch.equal(run(pipe, "sd", **kw), reference)
    with pytest.raises(ValueError, match="is not a LinearAG coefficients file"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
        LinearAGCoefficients.load(tmp_path / "other.safetensors")


# --- mismatches ---------------------------------------------------------------------------------

def test_step_count_mismatch(fitted):
    pipe = build("sd")
    with apply_guidance(pipe, LinearAG(fitted)):
        with pytest.raises(ValueError, match=r"num_inference_steps=5 but this call has num_inference_steps=3"):
            run(pipe, "sd")
    with apply_guidance(pipe, LinearAG.unfitted(5)):  # no provenance: the per-step check still holds
        with pytest.raises(ValueError, match=r"fitted for num_steps=5 model evaluations .* makes num_steps=3"):
            run(pipe, "sd")
    with pytest.raises(ValueError, match=r"num_steps=5 .* num_steps=10"):
        LinearAG(fitted).branches(make_ctx(num_steps=10))


def test_scheduler_pipeline_and_prediction_type_mismatch(fitted):
    pipe = build("sd", scheduler="EulerDiscreteScheduler")
    with apply_guidance(pipe, LinearAG(fitted)):
        with pytest.raises(ValueError, match=r"scheduler='DDIMScheduler' but this call has scheduler='EulerDiscrete"):
            run(pipe, "sd", num_inference_steps=5)
    dit = build("dit")
    with apply_guidance(dit, Rescale(LinearAG(fitted), phi=0.0)):  # on_call reaches wrapped strategies
        with pytest.raises(ValueError, match=WRONG_PIPELINE):
            run(dit, "dit", num_inference_steps=5)
    with pytest.raises(ValueError, match=WRONG_PIPELINE):
        LinearAG(fitted).check_compatible(CallDescription(pipeline="DiTPipeline"))
    v_pipe = build("sd", prediction_type="v_prediction")
    with apply_guidance(v_pipe, LinearAG(fitted)):
        with pytest.raises(ValueError, match=r"prediction_type='epsilon' but this model predicts 'v_prediction'"):
            run(v_pipe, "sd", num_inference_steps=5)
    shifted = dataclasses.replace(fitted, timesteps=[t - 20 for t in fitted.timesteps])
    with apply_guidance(build("sd"), LinearAG(shifted)) as handle:
        with pytest.raises(ValueError, match=r"step 0 runs at timestep=801 but .* fitted at timestep=781"):
            run(handle.pipe, "sd", num_inference_steps=5)


def test_negative_prompt_is_refused_and_the_empty_one_accepted(fitted):
    pipe = build("sd")
    with apply_guidance(pipe, LinearAG(fitted)):
        with pytest.raises(ValueError, match=r"negative_prompt=\['blurry, low quality', 'a drawing'\] is not suppo"):
            run(pipe, "sd", num_inference_steps=5, negative_prompt=["blurry, low quality", "a drawing"])
        assert torch.isfinite(run(pipe, "sd", num_inference_steps=5, negative_prompt=["", ""])).all()
    flux = build("flux")  # Flux's CFG needs a negative prompt: the empty one is fine
    with apply_guidance(flux, LinearAG.unfitted(3)):
        with pytest.raises(ValueError, match=r"negative_prompt=.* is not supported"):
            run(flux, "flux", **call_kwargs("flux", negative_prompt=True))
        assert torch.isfinite(run(flux, "flux")).all()


@pytest.mark.parametrize("make, match", [
    (lambda: LinearAGCoefficients.unfitted(3, plan=["cfg", "guess", "cond"]), r"plan=.* is invalid"),
    (lambda: LinearAGCoefficients.unfitted(3, plan=["estimate", "cfg", "cond"]), r"estimate step 0 has no previous"),
    (lambda: LinearAGCoefficients(["cfg", "estimate"], [[0, 0], [1, 0]], [[0, 0], [0, 1]], [0, 0], space="x0"),
     r"space='x0' is unknown"),
    (lambda: LinearAGCoefficients(["cond", "estimate"], [[0, 0], [1, 0]], [[0, 0], [0, 1]], [0, 0]),
     r"step 1 \(estimate\) has a nonzero uncond coefficient at lag 1"),
    (lambda: LinearAGCoefficients(["cfg", "cfg"], [[0, 0], [1, 0]], [[0, 0], [0, 0]], [0, 0]),
     r"step 1 \(cfg\) has a nonzero cond coefficient"),
    (lambda: LinearAG({"plan": ["cfg"], "oops": 1}), r"unknown keys \['oops'\]"),
    (lambda: LinearAG(3), r"coefficients=3 is invalid"),
    (lambda: LinearAG.unfitted(3, inner="cfg"), r"inner='cfg' is not a guidance strategy"),
    (lambda: fit_linear_ag(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), history=-1), r"history=-1 is invalid"),
    (lambda: fit_linear_ag(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), plan=["cfg"]), r"plan has 1 entries"),
])
def test_invalid_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_command_line_fit_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "embedded.safetensors"
    assert main(["--pipeline", "embedded", "--device", "cpu", "--steps", "4", "--scale", "3", "--num-samples", "3",
                 "--batch-size", "2", "--out", str(out)]) == 0
    c = LinearAGCoefficients.load(out)
    provenance = (c.pipeline, c.scheduler, c.num_inference_steps, c.num_samples)
    assert provenance == ("ClassConditionalPipeline", "DDIMScheduler", 4, 3)
    assert c.plan == ["cfg", "estimate", "cond", "cond"] and "per estimate step:\n  1: R^2=" in capsys.readouterr().out
    assert main(["--pipeline", str(tmp_path), "--scale", "3", "--out", str(out)]) == 2
    assert "--prompts FILE is required" in capsys.readouterr().err


def test_fit_on_a_sequential_pipeline_passes_the_negative_prompt_flux_needs():
    """Flux runs its unconditional call only with a negative prompt: the fit must give one, whatever
    the name of the sequential layout the adapter row uses."""
    torch.set_num_threads(1)
    c = fit_pipeline(build("flux"), PROMPTS[:2], 3, 3.0, plan=["cfg", "estimate", "cond"], batch_size=2,
                     progress=False, call_kwargs={"height": 32, "width": 32, "max_sequence_length": 16})
    assert c.pipeline == "FluxPipeline" and c.plan == ["cfg", "estimate", "cond"]


def test_fit_on_a_two_stage_solver_plans_one_kind_per_scheduler_step():
    torch.set_num_threads(1)
    c = fit_pipeline(build("sd", "HeunDiscreteScheduler"), PROMPTS[:2], 3, 7.5, batch_size=2, progress=False,
                     call_kwargs={"height": 32, "width": 32})
    # Heun: 3 steps -> 5 evaluations (predictor + corrector twice, then a last Euler step); the two
    # evaluations of one scheduler step share their kind, and guidance alternates per scheduler step.
    assert c.plan == ["cfg", "cfg", "estimate", "estimate", "cond"]
