"""Dynamic CFG: candidate next latents from the scheduler, same noise, uncorrupted multistep state,
per-sample choice, and the evaluators."""

import json

import pytest
import torch

from guidance import CFG, DynamicCFG, from_config, plot_schedules
from guidance.evaluators import CallableEvaluator, CLIPEvaluator
from pipelines import apply_guidance, load_embedded
from pipelines.call import EVALUATORS_DIR, load_embedded_evaluator

STEPS = 6
LABELS = [0, 3, 5, 9]


@pytest.fixture(scope="module")
def embedded():
    return load_embedded("cpu")


def pipe_with(scheduler: str | None):
    return load_embedded("cpu", scheduler=scheduler).pipe


def generators(n=len(LABELS), seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def generate(pipe, strategy, labels=LABELS, seed=0, eta=0.0, steps=STEPS, **kwargs):
    # The embedded pipeline reads init_noise_sigma before set_timesteps: set them first so that
    # Euler-type schedulers start from the same sigma in every run.
    pipe.scheduler.set_timesteps(steps)
    with apply_guidance(pipe, strategy):
        return pipe(labels, guidance_scale=3.0, num_inference_steps=steps, generator=generators(len(labels), seed),
                    eta=eta, output_type="pt", **kwargs).images


def pick(index_of_step):
    """An evaluator that prefers candidate `index_of_step(step)` for every sample (scores by position)."""
    calls = []

    def score(x, t, condition):
        k = len(SCALES)
        b = x.shape[0] // k
        s = torch.zeros(k, b)
        s[index_of_step(len(calls))] = 1.0
        calls.append(x.clone())
        return s.flatten()

    score.calls = calls
    return score


SCALES = [1.0, 3.0, 7.5]


def sharpness(x, t, condition):  # a per-sample evaluator: depends on each sample alone
    return -(x[:, :, 1:] - x[:, :, :-1]).abs().flatten(1).mean(1)


def brightness(x, t, condition):
    return x.flatten(1).mean(1)


# --- equivalences ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler, eta", [(None, 0.0), (None, 0.7), ("DDPMScheduler", 0.0)])
def test_one_candidate_scale_is_cfg_at_that_scale(scheduler, eta):
    pipe = pipe_with(scheduler)
    dyn = DynamicCFG(scales=[4.0], evaluators=[CallableEvaluator(sharpness)])
    a = generate(pipe, dyn, eta=eta)
    b = generate(pipe, CFG(4.0), eta=eta)
    assert torch.equal(a, b)
    assert dyn.history.shape == (len(LABELS), STEPS) and bool((dyn.history == 4.0).all())


@pytest.mark.parametrize("scheduler, eta", [(None, 0.0), (None, 0.8), ("DDPMScheduler", 0.0),
                                            ("EulerAncestralDiscreteScheduler", 0.0)])
def test_candidate_latents_are_the_schedulers_own_step(scheduler, eta):
    """Candidate k after step 0 equals the denoiser's input at step 1 of a CFG run at scales[k]: the
    scheduler's own step, noise included (stochastic schedulers), in the input scale (Euler's
    x / sqrt(sigma^2 + 1))."""
    pipe = pipe_with(scheduler)
    chooser = pick(lambda step: 0)
    generate(pipe, DynamicCFG(scales=SCALES, evaluators=[chooser]), eta=eta, steps=3)
    first = chooser.calls[0].view(len(SCALES), len(LABELS), 3, 32, 32)
    for k, scale in enumerate(SCALES):
        inputs = []
        hook = pipe.unet.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
        try:
            generate(pipe, CFG(scale), eta=eta, steps=3)
        finally:
            hook.remove()
        expected = inputs[1][len(LABELS):]  # the denoiser's input at step 1 (cond half)
        torch.testing.assert_close(first[k], expected, rtol=1e-5, atol=1e-5)
        assert not torch.equal(first[k], first[(k + 1) % len(SCALES)])


@pytest.mark.parametrize("scheduler", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", None])
def test_multistep_state_is_the_winners(scheduler):
    """A schedule that switches scale every step equals CFG with that per-step scale list: only the
    winner's prediction reaches the solver's history."""
    pipe = pipe_with(scheduler)
    order = [0, 2, 1, 2, 0, 1]
    dyn = DynamicCFG(scales=SCALES, evaluators=[pick(lambda step: order[step])])
    a = generate(pipe, dyn)
    b = generate(pipe, CFG([SCALES[i] for i in order]))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert dyn.history[0].tolist() == [SCALES[i] for i in order]


def test_choice_is_per_sample_and_independent_of_the_batch():
    pipe = pipe_with(None)
    evaluators = [CallableEvaluator(sharpness), CallableEvaluator(brightness)]
    dyn = DynamicCFG(scales=SCALES, evaluators=evaluators)
    both = generate(pipe, dyn)
    hist = dyn.history.clone()
    assert len({tuple(h.tolist()) for h in hist}) > 1, "samples should get different schedules"
    for i, label in enumerate(LABELS):
        alone = generate(pipe, dyn, labels=[label], seed=i)
        torch.testing.assert_close(alone[0], both[i], rtol=0, atol=1e-4)
        assert dyn.history[0].tolist() == hist[i].tolist()


def test_stochastic_scheduler_real_step_uses_the_candidates_noise():
    """DDPM with one generator per sample: a dynamic run that always picks scale 7.5 equals CFG(7.5)."""
    pipe = pipe_with("DDPMScheduler")
    a = generate(pipe, DynamicCFG(scales=SCALES, evaluators=[pick(lambda step: 2)]))
    b = generate(pipe, CFG(7.5))
    assert torch.equal(a, b)


def test_every_tiny_diffusers_pipeline_runs():
    """Text, class and flow pipelines, batched and sequential (Flux) layouts, five schedulers."""
    from tiny_pipelines import PIPELINE_NAMES, build, call_kwargs

    for name in PIPELINE_NAMES:
        pipe = build(name)
        seen = []

        def score(x, t, condition):
            seen.append(condition)
            return -x.flatten(1).abs().mean(1)

        dyn = DynamicCFG(scales=SCALES, evaluators=[score])
        with apply_guidance(pipe, dyn):
            images = pipe(**call_kwargs(name), generator=torch.Generator().manual_seed(0)).images
        assert torch.isfinite(images).all() and dyn.history.shape[0] == images.shape[0], name
        assert seen[0] is not None, f"{name}: the evaluator got no condition"


# --- adaptive weights --------------------------------------------------------------------------------------

def test_adaptive_weights_follow_relative_change_and_guard_zero():
    dyn = DynamicCFG(scales=SCALES, evaluators=[brightness, sharpness])
    scores = torch.tensor([[[1.0, 2.0]], [[3.0, 2.2]], [[5.0, 2.4]]])  # (K=3, B=1, E=2)
    assert dyn.evaluator_weights(scores).tolist() == [[1.0, 1.0]]  # first step: base weights
    dyn._prev = torch.tensor([[1.0, 2.0]])
    w = dyn.evaluator_weights(scores)  # relative changes 2.0 and 0.1
    torch.testing.assert_close(w, torch.tensor([[2.0 / 2.1, 0.1 / 2.1]]))
    dyn._prev = torch.tensor([[0.0, 2.2]])  # previous score 0: the eps floor keeps it finite
    w = dyn.evaluator_weights(scores)
    assert torch.isfinite(w).all() and abs(float(w.sum()) - 1) < 1e-6
    dyn._prev = scores.mean(0)  # no change at all: falls back to the base weights, normalised
    assert dyn.evaluator_weights(scores).tolist() == [[0.5, 0.5]]
    fixed = DynamicCFG(evaluators=[brightness, sharpness], weights=[2.0, 1.0], weighting="fixed")
    fixed._prev = torch.tensor([[1.0, 2.0]])
    assert fixed.evaluator_weights(scores).tolist() == [[2.0, 1.0]]


# --- configuration, errors, plot --------------------------------------------------------------------------

def test_config_round_trip_and_objects_refuse_to_serialise():
    dyn = DynamicCFG(scales=[1, 2.5], evaluators=["alignment"], weights=[2.0], weighting="fixed", eps=0.5,
                     normalize="candidates")
    back = from_config(dyn.to_config())
    assert isinstance(back, DynamicCFG) and back.to_config() == dyn.to_config()
    assert back.scales == [1.0, 2.5] and back.normalize == "candidates"
    with pytest.raises(ValueError, match="cannot be serialised"):
        DynamicCFG(evaluators=[sharpness]).to_config()


@pytest.mark.parametrize("kwargs, match", [
    ({"scales": []}, "scales=\\[\\] is invalid"),
    ({"scales": [1, float("nan")]}, "scales\\[1\\]=nan is invalid"),
    ({"evaluators": ["beauty"]}, "evaluators\\[0\\]='beauty' is not a registered evaluator"),
    ({"evaluators": []}, "evaluators=\\[\\] is empty"),
    ({"evaluators": ["alignment", "quality"], "weights": [1.0]}, "weights has 1 entries for 2 evaluators"),
    ({"weights": [0, 0]}, "all zero"),
    ({"weighting": "linear"}, "weighting='linear' is unknown"),
    ({"normalize": "rank"}, "normalize='rank' is unknown"),
    ({"eps": 0}, "eps=0 is out of range"),
])
def test_invalid_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicCFG(**kwargs)


def test_second_order_schedulers_and_bad_evaluators_are_refused():
    pipe = pipe_with("HeunDiscreteScheduler")
    with pytest.raises(ValueError, match="has order 2"):
        generate(pipe, DynamicCFG(evaluators=[sharpness]))
    with pytest.raises(ValueError, match="returned \\(1,\\) scores"):
        generate(pipe_with(None), DynamicCFG(evaluators=[lambda x, t, c: torch.zeros(1)]))


def test_plot_schedules_one_panel_per_class():
    history = torch.tensor([[1.0, 3.0, 7.5], [3.0, 3.0, 1.0], [7.5, 1.0, 1.0]])
    fig = plot_schedules(history, labels=[0, 1, 1], class_names=["airplane", "automobile"], scales=SCALES)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["airplane", "automobile"]
    assert len(visible[1].lines) == 2


# --- evaluators ------------------------------------------------------------------------------------------------

def test_x0_space_clip_evaluator_runs_with_random_open_clip():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                                                  image_size=32),
                           text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    clip = CLIPEvaluator(model, open_clip.get_tokenizer("ViT-B-32"), texts=[f"a photo of class {i}" for i in range(10)])
    seen = []

    def spy(x, t, c):
        seen.append((x.clone(), t.clone()))
        return clip(x, t, c)

    spy.space = "x0"
    dyn = DynamicCFG(scales=SCALES, evaluators=[spy])
    pipe = pipe_with(None)
    images = generate(pipe, dyn, steps=3)
    assert torch.isfinite(images).all() and dyn.history.shape == (4, 3)
    x0, t = seen[0]
    assert x0.shape == (len(SCALES) * 4, 3, 32, 32) and float(t[0]) == float(pipe.scheduler.timesteps[0])
    scores = clip(x0, t, torch.tensor(LABELS).repeat(len(SCALES)))
    assert scores.shape == (12,) and bool(((scores >= -1) & (scores <= 1)).all())


def test_clip_text_features_survive_the_per_step_device_move():
    """DynamicCFG moves its evaluators to the latents' device at every step; the CLIP evaluator's text
    features must stay cached across those moves (they were once dropped by every .to())."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                                                  image_size=32),
                           text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    clip = CLIPEvaluator(model, open_clip.get_tokenizer("ViT-B-32"))
    encoded, original = [], model.encode_text
    model.encode_text = lambda tokens: (encoded.append(len(tokens)), original(tokens))[1]
    x0, prompts = torch.rand(2, 3, 32, 32) * 2 - 1, ["a cat", "a dog"]
    first = clip(x0, torch.zeros(2), prompts)
    for _ in range(3):  # three more steps, each preceded by the move DynamicCFG makes
        torch.testing.assert_close(clip.to("cpu")(x0, torch.zeros(2), prompts), first)
    assert encoded == [2]


def test_deeper_noise_aware_net_is_residual_and_round_trips(tmp_path):
    from guidance.evaluators import NoiseAwareNet, load_net

    torch.manual_seed(0)
    net = NoiseAwareNet((8, 16), out_dim=10, depth=2)
    assert len(net.convs) == 4 and [c.stride for c in net.convs] == [(2, 2), (1, 1), (2, 2), (1, 1)]
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([0, 500, 999])
    # zeroing a stride-1 conv's weights, bias, norm affine and time bias leaves only its skip path
    shallow = NoiseAwareNet((8, 16), out_dim=10, depth=1)
    shallow.temb.load_state_dict(net.temb.state_dict())
    shallow.head.load_state_dict(net.head.state_dict())
    with torch.no_grad():
        for i in (1, 3):
            for m in (net.convs[i], net.norms[i], net.biases[i]):
                for p in m.parameters():
                    p.zero_()
        for j, i in enumerate((0, 2)):
            for a, b in ((shallow.convs[j], net.convs[i]), (shallow.norms[j], net.norms[i]),
                         (shallow.biases[j], net.biases[i])):
                a.load_state_dict(b.state_dict())
    torch.testing.assert_close(net(x, t), shallow(x, t))
    net.save_pretrained(tmp_path / "net", config={**net.config, "kind": "alignment"})
    loaded = load_net(tmp_path / "net")
    config = json.loads((tmp_path / "net" / "config.json").read_text())
    assert config["depth"] == 2 and config["kind"] == "alignment" and loaded.config["depth"] == 2
    torch.testing.assert_close(loaded(x, t), net(x, t))
    with pytest.raises(ValueError, match="depth=0"):
        NoiseAwareNet(depth=0)


def test_clean_lookahead_scores_the_clamped_x0_estimate_at_t0():
    from guidance.evaluators import CleanLookahead

    seen = []

    def inner(x, t, c):
        seen.append((x.clone(), t.clone()))
        return x.flatten(1).mean(1)

    lookahead = CleanLookahead(CallableEvaluator(inner, name="spy"))
    assert lookahead.space == "x0" and lookahead.name == "spy-x0"
    dyn = DynamicCFG(scales=SCALES, evaluators=[lookahead])
    pipe = pipe_with(None)
    generate(pipe, dyn, steps=3)
    x, t = seen[0]
    assert x.shape == (len(SCALES) * len(LABELS), 3, 32, 32) and bool((t == 0).all())
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    # the inner score is the mean pixel of the clamped x0: the winner is the candidate with the largest one
    x0 = x.view(len(SCALES), len(LABELS), -1).mean(-1)
    chosen = torch.tensor(SCALES)[x0.argmax(0)]
    assert torch.equal(dyn.history[:, 0], chosen)


SHIPPED = EVALUATORS_DIR


def test_shipped_evaluators_are_small_and_informative(cifar10_dir):
    from pipelines.embedded.training.common import load_cifar10, to_model_range

    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size < 2_000_000
    images, labels = load_cifar10(cifar10_dir, "test")
    x, y = to_model_range(images[:200]), labels[:200]
    t = torch.zeros(200)
    align = load_embedded_evaluator("alignment")
    right = align(x, t, y)
    wrong = align(x, t, (y + 1) % 10)
    assert float((right > wrong).float().mean()) > 0.7
    torch.testing.assert_close(load_embedded_evaluator("alignment-x0")(x, torch.full((200,), 500), y), right)
    quality = load_embedded_evaluator("quality")
    noise = torch.randn(200, 3, 32, 32).clamp(-1, 1)
    assert float(quality(x, t, None).mean()) > float(quality(noise, t, None).mean())


def test_default_dynamic_cfg_on_the_embedded_model(embedded):
    dyn = DynamicCFG()
    images = generate(embedded.pipe, dyn)
    assert torch.isfinite(images).all()
    assert dyn.history.shape == (4, STEPS) and set(dyn.history.flatten().tolist()) <= set(dyn.scales)
    assert dyn.weight_history.shape == (4, STEPS, 2)
    torch.testing.assert_close(dyn.weight_history[:, 1:].sum(-1), torch.ones(4, STEPS - 1))
