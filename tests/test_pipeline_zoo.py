"""Every class in the adapter table, on a tiny pipeline: the hook is exact, counts what it evaluates,
and leaves no trace. One parametrised test per class (a few pipeline calls each)."""

import functools
import inspect

import pytest
import torch

import diffusers
from pipeline_zoo import ALL_CASES, CASES, build, call_kwargs, denoisers

from guidance import APG, CFG, Interval
from pipelines import apply_guidance
from pipelines.adapters import DIFFUSERS_ADAPTERS, adapter_for

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread_per_module")]


def run(pipe, kwargs) -> torch.Tensor:
    torch.manual_seed(0)
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]


def count_rows(pipe) -> dict:
    """Wrap each denoiser's forward (below the hook) to count the rows it really evaluates."""
    counter = {"rows": 0}
    sample_kw = adapter_for(pipe).sample_kw
    for module in denoisers(pipe):
        original = module.forward

        def counting_forward(*args, _original=original, **kwargs):
            x = args[0] if args else kwargs[sample_kw]
            counter["rows"] += len(x) if isinstance(x, list) else x.shape[0]  # a list: one tensor per row (Z-Image)
            return _original(*args, **kwargs)

        module.forward = counting_forward
    return counter


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_every_adapter_row_has_a_tiny_pipeline():
    assert sorted(DIFFUSERS_ADAPTERS) == sorted(CASES)


# Kandinsky 3 applies (s + 1) g - s g to the hook's [g; g]: float32 rounding of about (2 s + 1) ulps of g a step,
# which its MoVQ decoder carries to 1.0e-5 of the image in some thread configurations (the whole suite's).
CFG_ROUNDING = {"Kandinsky3Pipeline": 3e-5, "Kandinsky3Img2ImgPipeline": 3e-5}


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_hook_is_exact_counts_rows_and_leaves_no_trace(name):
    pipe, kwargs = build(name), call_kwargs(name)
    assert type(pipe).__name__ == name.split("[")[0]
    native = run(pipe, kwargs)
    counter = count_rows(pipe)
    with apply_guidance(pipe, CFG()) as handle:
        hooked = run(pipe, kwargs)
    assert relative_error(hooked, native) <= CFG_ROUNDING.get(name.split("[")[0], 1e-5)
    steps = int(handle.nfe[0]) // 2
    assert steps >= 2 and handle.nfe.tolist() == [2 * steps] * native.shape[0]
    assert counter["rows"] == int(handle.nfe.sum())

    # APG works in x0: eps -> x0 -> eps divides by sigma, so float32 rounding grows ~1/sigma at the last
    # step (sigma 0.04 at t=1 with linear betas: 6e-5 per step on Kandinsky inpainting, 4e-4 at the end).
    with apply_guidance(pipe, APG(eta=1.0, norm_threshold=0.0, momentum=0.0)):
        assert relative_error(run(pipe, kwargs), native) <= 1e-3

    counter["rows"] = 0
    with apply_guidance(pipe, Interval(CFG(), start=0.0, stop=0.34)) as handle:  # unconditional rows on step 0 only
        interval = run(pipe, kwargs)
    from pipelines.parametrization import evaluations_per_step

    # steps: the denoiser evaluations per branch; step 0 has one (two on Heun: predictor and corrector), in each
    # diffusion run (unCLIP: the prior's, then the decoder's)
    a = adapter_for(pipe)
    runs = len(denoisers(pipe)) if a.denoisers_in_turn else 1
    assert handle.nfe.tolist() == [steps + runs * evaluations_per_step(a.scheduler_of(pipe))] * native.shape[0]
    assert counter["rows"] == int(handle.nfe.sum())
    assert torch.isfinite(interval).all() and not torch.equal(interval, native)

    assert torch.equal(run(pipe, kwargs), native), "removal must restore bit-identical behaviour"
    assert type(pipe).__name__ == name.split("[")[0] and all("guidance_kit" not in str(m._diffusers_hook.hooks)
                                              for m in denoisers(pipe) if hasattr(m, "_diffusers_hook"))


def test_wan22_both_experts_are_guided_with_their_own_scale():
    name = "WanPipeline[2.2 two experts]"
    pipe, kwargs = build(name), call_kwargs(name)
    rows = []
    for module in denoisers(pipe):
        rows.append(0)
        module.register_forward_pre_hook(lambda m, a, kw, i=len(rows) - 1: rows.__setitem__(i, rows[i] + 1),
                                         with_kwargs=True)
    native = run(pipe, kwargs)
    assert len(rows) == 2 and min(rows) > 0, rows  # both experts ran
    assert not torch.equal(run(pipe, {**kwargs, "guidance_scale_2": 2.0}), native)
    with apply_guidance(pipe, CFG()):
        assert relative_error(run(pipe, kwargs), native) <= 1e-5
    with apply_guidance(pipe, CFG(scale=2.0)):  # one scale for both experts overrides the call's two
        both = run(pipe, kwargs)
    assert relative_error(both, run(pipe, {**kwargs, "guidance_scale": 2.0, "guidance_scale_2": 2.0})) <= 1e-5


@pytest.mark.parametrize("name", ["StableDiffusionXLInpaintPipeline", "FluxImg2ImgPipeline", "QwenImagePipeline",
                                  "FluxPipeline"])
def test_several_images_per_prompt_stay_exact(name):
    """num_images_per_prompt=2 on two prompts (and their negative prompts / embeddings): batch 4 per branch."""
    pipe = build(name)
    key = "num_videos_per_prompt" if "num_videos_per_prompt" in inspect.signature(type(pipe).__call__).parameters \
        else "num_images_per_prompt"
    kwargs = {**call_kwargs(name), key: 2}
    if "prompt" in kwargs:
        kwargs["negative_prompt"] = ["blurry", "a drawing"]
    native = run(pipe, kwargs)
    with apply_guidance(pipe, CFG()) as handle:
        hooked = run(pipe, kwargs)
    assert native.shape[0] == 4 and handle.nfe.shape == (4,)
    assert relative_error(hooked, native) <= 1e-5


RESCALE_CASES = sorted(n for n in ALL_CASES if "guidance_rescale" in inspect.signature(
    getattr(diffusers, n.split("[")[0]).__call__).parameters)


def test_rescale_cases_are_found():
    assert {"StableDiffusionPipeline", "StableDiffusionXLPipeline"} <= set(RESCALE_CASES)


@pytest.mark.parametrize("name", RESCALE_CASES)
def test_the_calls_guidance_rescale_holds_for_every_strategy(name):
    """The pipeline rescales after its CFG; through the hook the call's guidance_rescale is applied to whatever
    the strategy returns: APG(eta=1, r=0, beta=0), which is CFG, equals the native rescaled call."""
    pipe, kwargs = build(name), {**call_kwargs(name), "guidance_rescale": 0.7}
    native = run(pipe, kwargs)
    assert relative_error(native, run(pipe, call_kwargs(name))) > 1e-3  # the rescale changes the output here
    with apply_guidance(pipe, CFG()):
        assert relative_error(run(pipe, kwargs), native) <= 1e-5
    with apply_guidance(pipe, APG(eta=1.0, norm_threshold=0.0, momentum=0.0)):
        assert relative_error(run(pipe, kwargs), native) <= 1e-3


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_the_noise_level_read_is_the_one_the_scheduler_steps_with(name):
    """APG(eta=1, r=0, beta=0) equals CFG whatever sigma it is handed, so the exactness test cannot see a wrong
    noise level. Here each step's noise level as the hook reads it is compared with the one the scheduler's own
    step uses: the sigma-table entry of its step index, alphas_cumprod at the timestep it is given (DDIM-type), or
    DDPMWuerstchenScheduler's cosine at the ratio it is given."""
    from guidance import CFG as _CFG
    from pipelines.parametrization import evaluations_per_step, prediction_type, rule

    pipe, kwargs = build(name), call_kwargs(name)
    a = adapter_for(pipe)  # unCLIP: the prior's scheduler, then the decoder's
    schedulers = [a.scheduler_of(pipe, e) for e in range(len(a.denoisers) if a.denoisers_in_turn else 1)]
    scheduler = schedulers[0]
    if evaluations_per_step(scheduler) != 1:
        pytest.skip("two evaluations per step (Heun): its noise levels are checked against the scheduler in "
                    "tests/test_parametrization.py")
    by_table = rule(scheduler) in ("sigmas", "preconditioned")  # EDM schedulers step with sigmas[step_index] too
    read, stepped, run_start = [], [], [0]
    # Cosmos text-to-world steps once for x0, rewinds its scheduler's step index and steps again: one entry per index
    rewound: dict[int, int] = {}

    class Spy(_CFG):
        def reset(self):  # a call begins, or (unCLIP) the next denoiser's run
            run_start[0] = len(read)
            super().reset()

        def guide(self, ctx, preds):
            if ctx.starts_step and ctx.scheduler_step == len(read) - run_start[0]:
                read.append(float(ctx.param.noise_level.flatten()[0]))
            return super().guide(ctx, preds)

    def step(*args, scheduler, original, **kw):
        out = original(*args, **kw)
        if by_table:
            if rewound.get(id(scheduler)) == scheduler.step_index:  # the step at this index again: see `rewound`
                return out
            rewound[id(scheduler)] = scheduler.step_index
            table = float(scheduler.sigmas[scheduler.step_index - 1])
            inverted = prediction_type(scheduler) == "flow" and getattr(scheduler.config, "invert_sigmas", False)
            stepped.append(1.0 - table if inverted else table)  # Mochi's table holds the data fraction
        elif rule(scheduler) == "ratio":  # DDPMWuerstchenScheduler: its own cosine at the ratio its step is given
            abar = float(scheduler._alpha_cumprod(kw["timestep"], kw["timestep"].device)[0])
            stepped.append(((1 - abar) / abar) ** 0.5)
        else:
            t = args[1] if len(args) > 1 else kw["timestep"]
            abar = float(scheduler.alphas_cumprod[int(t)])
            stepped.append(((1 - abar) / abar) ** 0.5 if prediction_type(scheduler) != "flow" else 1 - abar)
        return out

    for s in schedulers:
        s.step = functools.partial(step, scheduler=s, original=s.step)
    try:
        with apply_guidance(pipe, Spy()):
            run(pipe, kwargs)
    finally:
        for s in schedulers:
            del s.step
    assert len(read) >= 2 and read == pytest.approx(stepped[: len(read)], rel=1e-5), (read, stepped)


def _other_scheduler(scheduler):
    """A second solver of the same family: DPM-Solver++ for DDPM-type schedulers, FlowMatch Heun (two
    evaluations per step) for flow matching, EDM Euler / EDM DPM-Solver++ for the EDM ones; None where the family
    has no other one here."""
    from pipelines.parametrization import PRECONDITIONED, prediction_type

    config = scheduler.config
    if type(scheduler).__name__ in PRECONDITIONED:  # EDM: Euler, or DPM-Solver++ for Euler
        euler = type(scheduler).__name__ == "EDMEulerScheduler"
        return (diffusers.EDMDPMSolverMultistepScheduler if euler else diffusers.EDMEulerScheduler).from_config(config)
    if prediction_type(scheduler) == "flow":
        if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler" or config.get("use_dynamic_shifting"):
            return None
        return diffusers.FlowMatchHeunDiscreteScheduler.from_config(config)
    if not hasattr(scheduler, "alphas_cumprod"):
        return None
    try:
        return diffusers.DPMSolverMultistepScheduler.from_config(config)
    except NotImplementedError:  # a beta schedule DPM-Solver++ does not take (Shap-E's "exp")
        return None


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_the_hook_stays_exact_under_a_second_scheduler(name):
    pipe, kwargs = build(name), call_kwargs(name)
    attr = adapter_for(pipe).schedulers[0]
    other = _other_scheduler(getattr(pipe, attr))
    if other is None:
        pytest.skip(f"{type(getattr(pipe, attr)).__name__}: no second solver of its family here")
    setattr(pipe, attr, other)
    try:
        native = run(pipe, kwargs)
    except Exception as e:  # noqa: BLE001 - the pipeline itself does not take this solver
        pytest.skip(f"{name} does not run with {type(other).__name__} natively: {type(e).__name__}: {e}"[:300])
    with apply_guidance(pipe, CFG()):
        assert relative_error(run(pipe, kwargs), native) <= 1e-5
    with apply_guidance(pipe, APG(eta=1.0, norm_threshold=0.0, momentum=0.0)):
        assert relative_error(run(pipe, kwargs), native) <= 1e-3


def test_svd_per_frame_scale_ramp_is_refused_naming_both_scales():
    pipe, kwargs = build("StableVideoDiffusionPipeline"), call_kwargs("StableVideoDiffusionPipeline")
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    with apply_guidance(pipe, CFG()), pytest.raises(ValueError, match=r"min_guidance_scale=1.0 and "
                                                                        r"max_guidance_scale=3.0: it then guides each"):
        run(pipe, {**kwargs, "min_guidance_scale": 1.0})
    assert not calls  # refused before any step
