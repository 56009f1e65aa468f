"""Cosmos world pipelines (tests/zoo_cosmos.py): the x0 the hook reads is the x0 each pipeline guides and steps with.

Text-to-world and Cosmos 2 video-to-world turn each branch's transformer output F into x0 before their CFG
c + s (c - u): text-to-world with its EDM scheduler's step (then rewound), Cosmos 2 video-to-world with its own
c_skip x + c_out F, after which it replaces x0 on its conditioning frames by the conditioning latents in both branches.
Cosmos 2.5 replaces each branch's velocity on its conditioning frames by the ground truth (latents - cond_latent) and
steps its sample there, which is not the transformer's input. APG(eta=1, r=0, beta=0) equals CFG through any pair of
mutually inverse conversions, so the zoo's exactness test cannot see a wrong coefficient or a missed overwrite; here
the x0 of each branch and of the guided prediction is compared with the pipeline's own."""

import pytest
import torch

from pipeline_zoo import build, call_kwargs

from guidance import APG, CFG, DynamicCFG
from guidance.base import COND, UNCOND
from pipelines import apply_guidance

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread_per_module")]

CASES = ("CosmosTextToWorldPipeline", "Cosmos2VideoToWorldPipeline", "Cosmos2_5_PredictBasePipeline")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _run_spied(name: str, strategy_class=CFG, scheduler=None):
    """Runs the case through the hook with a spy strategy (and `scheduler` in place of the case's, if given).
    Returns (per step: the x0 the strategy read of the cond, uncond and guided predictions, and those predictions as
    it was handed them ("v"); per step: the x0 the scheduler stepped with; what the pipeline's prepare_latents
    returned: Cosmos 2 video-to-world's conditioning latents and frame indicator, Cosmos 2.5's noise, conditioning
    latents and mask)."""
    pipe, kwargs = build(name), call_kwargs(name)
    if scheduler is not None:
        pipe.scheduler = scheduler
    scheduler = pipe.scheduler
    read, stepped, conditioning = [], [], {}

    class Spy(strategy_class):
        def guide(self, ctx, preds):
            guided = super().guide(ctx, preds)
            read.append({k: ctx.to_x0(v) for k, v in ((COND, preds[COND]), (UNCOND, preds[UNCOND]), ("g", guided))})
            read[-1]["v"] = {COND: preds[COND], UNCOND: preds[UNCOND]}
            return guided

    original_step = scheduler.step

    def step(output, t, sample, *args, **kw):
        result = original_step(output, t, sample, *args, **kw)
        if name == "CosmosTextToWorldPipeline":
            if kw.get("pred_original_sample") is not None:  # its second step; the first only converts to x0
                stepped.append(kw["pred_original_sample"])
        else:  # the velocity (x - x0) / sigma it computes from the guided x0
            stepped.append(sample - scheduler.sigmas[scheduler.step_index - 1] * output)
        return result

    original_prepare = getattr(pipe, "prepare_latents")

    def prepare_latents(*args, **kw):
        out = original_prepare(*args, **kw)
        if name == "Cosmos2VideoToWorldPipeline":  # latents, conditioning latents, cond indicator, ...
            conditioning.update(latents=out[1], indicator=out[2])
        if name == "Cosmos2_5_PredictBasePipeline":  # latents, conditioning latents, cond mask, cond indicator
            conditioning.update(noise=out[0], latents=out[1], mask=out[2])
        return out

    scheduler.step, pipe.prepare_latents = step, prepare_latents
    try:
        with apply_guidance(pipe, Spy()):
            pipe(**kwargs, generator=torch.Generator().manual_seed(0))
    finally:
        del scheduler.step, pipe.prepare_latents
    assert "prepare_latents" not in vars(pipe)  # the layout that wraps it for the call (Cosmos 2.5) restored it
    conditioning["sigmas"] = scheduler.sigmas  # the call's table
    return read, stepped, conditioning


@pytest.mark.parametrize("name", CASES)
def test_the_x0_read_is_the_one_the_pipeline_steps_with(name):
    read, stepped, _ = _run_spied(name)
    assert len(read) == len(stepped) >= 2
    errors = [relative_error(r["g"], s) for r, s in zip(read, stepped)]
    assert max(errors) <= 1e-5, errors


def test_cosmos2_video_branches_read_the_conditioning_latents_on_the_conditioning_frames():
    """The pipeline replaces x0 by the conditioning latents on those frames in both branches before its CFG: the
    x0-space rules see exactly that (so their difference is 0 there), and the frames it denoises are left as read."""
    read, _, conditioning = _run_spied("Cosmos2VideoToWorldPipeline")
    frames = conditioning["indicator"].flatten().bool()
    assert frames.any() and not frames.all()  # the image's latent frame, then frames to denoise
    target = conditioning["latents"][:, :, frames]
    for r in read:
        for branch in (COND, UNCOND, "g"):
            assert relative_error(r[branch][:, :, frames], target) <= 1e-6
        assert not torch.equal(r[COND][:, :, ~frames], r[UNCOND][:, :, ~frames])


@pytest.mark.parametrize("name", ["Cosmos2VideoToWorldPipeline", "Cosmos2_5_PredictBasePipeline"])
def test_x0_space_rules_run_and_keep_the_conditioning_frames(name):
    """An x0-space rule that mixes frames (APG's projection, eta=0) runs: finite, different from CFG, and the frames
    the pipeline conditions on come out as natively (Cosmos 2: the last step moves the first latent frame onto the
    conditioning latents; Cosmos 2.5: every branch steps it with the ground-truth velocity)."""
    pipe, kwargs = build(name), call_kwargs(name)
    native = pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]
    with apply_guidance(pipe, APG(eta=0.0, norm_threshold=0.0, momentum=0.0)):
        apg = pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]
    assert torch.isfinite(apg).all() and relative_error(apg, native) > 1e-4
    assert relative_error(apg[:, :, :1], native[:, :, :1]) <= 1e-5
    assert "prepare_latents" not in vars(pipe)  # the conditioned-velocity layout's wrapper is gone after the call


@pytest.mark.parametrize("name", ["Cosmos2VideoToWorldPipeline", "Cosmos2_5_PredictBasePipeline"])
def test_dynamic_cfg_is_refused_on_cosmos2_video(name):
    """DynamicCFG steps scheduler copies with the guided output; Cosmos 2 video-to-world steps with a velocity it
    computes from x0, Cosmos 2.5 with the output after replacing it on the conditioning frames."""
    pipe = build(name)
    with apply_guidance(pipe, DynamicCFG()), pytest.raises(ValueError, match=f"DynamicCFG: {name} hands its "
                                                                              "scheduler a transform"):
        pipe(**call_kwargs(name))


def test_cosmos2_video_without_its_layout_is_refused_for_x0_but_runs_cfg():
    """The conditioning frames come from the call's condition_mask; a rule given none refuses x0 (naming why) and
    CFG, which never converts, still runs."""
    from pipelines.parametrization import step_parametrization
    from pipelines.preconditioning import cosmos2_video_parametrization

    scheduler = build("Cosmos2VideoToWorldPipeline").scheduler  # its sigma range set by the pipeline
    scheduler.set_timesteps(sigmas=torch.linspace(0, 1, 3, dtype=torch.float64).numpy())  # as the pipeline does
    assert scheduler.sigmas[0] > 1  # step 0: sigma_max
    x = torch.randn(2, 4, 3, 2, 2)
    param = step_parametrization(scheduler, 0.5, x, {"preconditioning": "cosmos2_video"})
    with pytest.raises(ValueError, match="Cosmos2VideoToWorldPipeline: no condition_mask"):
        param.to_x0(x)
    mask = torch.zeros(2, 1, 3, 2, 2)
    mask[:, :, 0] = 1
    param = cosmos2_video_parametrization(scheduler, 0.5, x, {"condition_mask": mask})
    out = torch.randn_like(x)
    x0 = param.to_x0(out)
    assert torch.allclose(x0[:, :, 0], x[:, :, 0]) and not torch.allclose(x0[:, :, 1:], x[:, :, 1:])
    back = param.from_x0(x0)
    assert (back[:, :, 0] == 0).all() and torch.allclose(back[:, :, 1:], out[:, :, 1:], rtol=1e-5, atol=1e-6)


def _flow_euler():
    import diffusers

    return diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)  # a second solver of its flow sigmas


@pytest.mark.parametrize("scheduler", [None, _flow_euler], ids=["UniPC", "FlowMatchEuler"])
def test_cosmos2_5_branches_read_the_velocity_and_x0_it_steps_on_the_conditioning_frames(scheduler):
    """The pipeline replaces each branch's velocity by gt = (noise - conditioning latents) on the conditioning frames
    and steps its sample there, which moves along noise + (sigma - sigma_0) gt: strategies are handed gt in both
    branches and read the x0 it steps with, noise - sigma_0 gt (not the conditioning latents: sigma_0 < 1), in every
    branch; the frames it denoises are left as the transformer predicts them. Under its UniPC and under Euler."""
    name = "Cosmos2_5_PredictBasePipeline"
    read, stepped, conditioning = _run_spied(name, scheduler=scheduler and scheduler())
    frames = conditioning["mask"][0, 0, :, 0, 0].bool()
    assert frames.any() and not frames.all()  # the image's latent frame, then frames to denoise
    noise, target = conditioning["noise"][:, :, frames], conditioning["latents"][:, :, frames]
    gt = noise - target
    sigma_0 = float(conditioning["sigmas"][0])
    assert len(read) == len(stepped) >= 2
    for r, s in zip(read, stepped):
        assert relative_error(r["g"], s) <= 1e-5
        assert relative_error(s[:, :, frames], noise - sigma_0 * gt) <= 1e-5  # the line's x0, at every step
        for branch in (COND, UNCOND):
            assert relative_error(r["v"][branch][:, :, frames], gt.expand_as(r["v"][branch][:, :, frames])) <= 1e-6
            assert relative_error(r[branch][:, :, frames], s[:, :, frames]) <= 1e-5
        assert not torch.equal(r[COND][:, :, ~frames], r[UNCOND][:, :, ~frames])
    if scheduler is None:  # its UniPC starts at sigma 200/201: x0 there is not the conditioning latents
        assert relative_error(stepped[0][:, :, frames], target.expand_as(noise)) > 1e-3


def test_cosmos2_5_text_to_world_mode_is_exact():
    """Without an image or video no frame is conditioned (gt = 0, mask 0): CFG and APG(eta=1, r=0, beta=0) through
    the hook equal its own CFG there too."""
    name = "Cosmos2_5_PredictBasePipeline"
    pipe, kwargs = build(name), {k: v for k, v in call_kwargs(name).items() if k != "image"}
    native = pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]
    for strategy in (CFG(), APG(eta=1.0, norm_threshold=0.0, momentum=0.0)):
        with apply_guidance(pipe, strategy):
            assert relative_error(pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0], native) <= 1e-5
