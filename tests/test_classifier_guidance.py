"""Classifier-based guidance: EluCD (calibrated classifier guidance) and GFCG (our reading)."""

import gc
import math

import pytest
import torch
from test_hook import count_rows
from test_strategies import make_ctx, random_preds
from tiny_pipelines import build, call_kwargs, denoiser
from torch import nn

from guidance import (
    CFG, COND, REF, UNCOND, CalibratedClassifierGuidance, ClassifierGuidance, GFCG, ImageClassifier, class_prompts,
    from_config, smooth_relu,
)
from guidance.elucd import classifier_objective, sine_bump_schedule
from guidance.gfcg import adaptive_scale, reference_class
from pipelines import apply_guidance, load_embedded


def tiny_classifier(channels=4, classes=5, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))
    return net.to(dtype)


class Constant(nn.Module):
    """A 'classifier' certain of `label` (an id, or one per sample): logit gap 1000, so p_other == 0.0."""

    def __init__(self, label, classes=10):
        super().__init__()
        self.label, self.classes = torch.as_tensor(label), classes
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        labels = self.label.expand(x.shape[0]) if self.label.ndim == 0 else self.label[: x.shape[0]]
        return torch.nn.functional.one_hot(labels, self.classes).float() * 1000.0 + 0 * self.dummy


def live_tensors():
    gc.collect()
    return sum(type(o) in (torch.Tensor, nn.Parameter) for o in gc.get_objects())


@pytest.fixture(scope="module")
def embedded():
    return load_embedded("cpu")


def sample(pipe, strategy=None, labels=(0, 1), steps=4, seeds=(3, 4), scale=3.0):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    kw = dict(class_labels=list(labels), guidance_scale=scale, num_inference_steps=steps, generator=gens,
              output_type="pt")
    if strategy is None:
        return pipe(**kw).images, None
    with apply_guidance(pipe, strategy) as handle:
        images = pipe(**kw).images
    return images, handle.nfe


# --- the classifier interface -----------------------------------------------------------------------

def test_smooth_relu_swaps_every_relu_and_leaves_the_original():
    net = tiny_classifier()
    smooth = smooth_relu(net, beta=3.0)
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 2
    assert not any(isinstance(m, nn.ReLU) for m in smooth.modules())
    assert sum(isinstance(m, nn.Softplus) and m.beta == 3.0 for m in smooth.modules()) == 2
    x = torch.randn(2, 4, 8, 8)
    sharp = smooth_relu(net, beta=1e4)  # Softplus(beta -> inf) -> ReLU
    torch.testing.assert_close(sharp(x), net(x), atol=1e-3, rtol=0)
    assert not torch.allclose(smooth(x), net(x), atol=1e-3)
    with pytest.raises(ValueError, match=r"beta=0 is invalid"):
        smooth_relu(net, 0)


def test_image_classifier_maps_range_size_and_normalisation():
    seen = {}

    class Spy(nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.mean(dim=(2, 3))

    clf = ImageClassifier(Spy(), input_range=(0, 1), size=16, mean=[0.5] * 3, std=[0.25] * 3)
    clf.logits(torch.ones(2, 3, 8, 8))  # +1 in [-1, 1] = 1.0 in [0, 1] -> (1 - 0.5) / 0.25 = 2
    assert seen["x"].shape == (2, 3, 16, 16)
    torch.testing.assert_close(seen["x"], torch.full((2, 3, 16, 16), 2.0))
    with pytest.raises(ValueError, match=r"input_range=\(1, 0\) is invalid"):
        ImageClassifier(Spy(), input_range=(1, 0))
    assert class_prompts([1, 0], ["cat", "dog"], "a photo of a {}") == ["a photo of a dog", "a photo of a cat"]


# --- EluCD --------------------------------------------------------------------------------------------

def test_gradient_matches_finite_differences():
    net = tiny_classifier(dtype=torch.float64)
    s = CalibratedClassifierGuidance(net, tau1=1.0, tau2=0.5, softplus_beta=3.0)
    x0 = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    y = torch.tensor([1, 3])
    g = s.gradient(x0, y)
    smooth = s.smooth_classifier

    def objective(x):
        return classifier_objective(smooth.logits(x), y, 1.0, 0.5).sum()

    eps = 1e-6
    for idx in [(0, 0, 0, 0), (0, 2, 3, 1), (1, 3, 5, 5), (1, 1, 2, 4)]:
        e = torch.zeros_like(x0)
        e[idx] = eps
        fd = (objective(x0 + e) - objective(x0 - e)) / (2 * eps)
        assert abs(fd.item() - g[idx].item()) < 1e-7 * max(1.0, abs(fd.item()))


def test_objective_is_log_softmax_at_equal_temperatures_and_the_logit_at_tau2_zero():
    logits = torch.randn(3, 7)
    y = torch.tensor([0, 4, 6])
    torch.testing.assert_close(classifier_objective(logits, y, 1, 1), logits.log_softmax(1)[range(3), y])
    torch.testing.assert_close(classifier_objective(logits, y, 2, 0), 2 * logits[range(3), y] - math.log(7))


def test_scale_zero_is_the_inner_strategy_exactly_and_a_step_raises_the_objective():
    ctx, p = make_ctx(batch=2, shape=(4, 8, 8)), random_preds(batch=2, shape=(4, 8, 8))
    ctx.labels = torch.tensor([1, 2])
    net = tiny_classifier()
    zero = CalibratedClassifierGuidance(net, scale=0.0)
    assert torch.equal(zero.combine(ctx, p), CFG().combine(ctx, p))
    s = CalibratedClassifierGuidance(net, scale=0.05, gamma=0.0, step_rule="x0")
    base_x0 = ctx.to_x0(CFG().combine(ctx, p))
    guided_x0 = ctx.to_x0(s.combine(ctx, p))
    # normalized form: each sample's x0 moves by exactly lambda_i in RMS (step 0 of 10: lambda = scale)
    shift = (guided_x0 - base_x0).pow(2).mean(dim=(1, 2, 3)).sqrt()
    torch.testing.assert_close(shift, torch.full((2,), 0.05 * 11 / 11), atol=1e-4, rtol=1e-3)
    clf = s.smooth_classifier
    before = classifier_objective(clf.logits(base_x0), ctx.labels, 1.0, 0.5)
    after = classifier_objective(clf.logits(guided_x0), ctx.labels, 1.0, 0.5)
    assert bool((after > before).all())


def test_score_form_matches_dhariwal_nichol():
    ctx, p = make_ctx(batch=2, shape=(4, 8, 8), kind="epsilon"), random_preds(batch=2, shape=(4, 8, 8))
    ctx.labels = torch.tensor([0, 3])
    net = tiny_classifier()
    s = ClassifierGuidance(net, scale=0.7)  # conditional model + s * grad log p(y | x0), score form
    x0 = ctx.to_x0(p[COND])
    x = x0.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(net(x).log_softmax(1)[range(2), ctx.labels].sum(), x)
    expected = x0 + 0.7 * (ctx.param.sigma / ctx.param.alpha) ** 2 * g
    torch.testing.assert_close(ctx.to_x0(s.combine(ctx, p)), expected.float(), atol=1e-4, rtol=1e-4)
    assert set(s.branches(ctx)) == {COND} and not s.requires_uncond


def test_sine_bump_schedule():
    assert sine_bump_schedule(0, 10, 0.3) == pytest.approx(1.0)
    assert sine_bump_schedule(5, 10, 0.3) == pytest.approx(6 / 11 + 0.3)
    assert sine_bump_schedule(10, 10, 0.0) == pytest.approx(1 / 11)


def test_elucd_scale_zero_equals_native_cfg_through_the_pipeline(embedded):
    native, _ = sample(embedded.pipe)
    guided, nfe = sample(embedded.pipe, CalibratedClassifierGuidance(embedded.guidance_classifier, scale=0.0))
    assert torch.equal(guided, native)
    assert nfe.tolist() == [8, 8]


def test_elucd_no_gradient_leaks_and_no_growth(embedded):
    pipe = embedded.pipe
    s = CalibratedClassifierGuidance("embedded-guidance", scale=0.1)
    sample(pipe, s)  # warm-up
    gc.collect()
    live = live_tensors()
    images, _ = sample(pipe, s, steps=6)
    gc.collect()
    assert live_tensors() <= live + 2  # nothing kept per step (6 steps here vs 4 before)
    assert not images.requires_grad
    assert all(p.grad is None for p in pipe.unet.parameters())
    assert all(p.grad is None for p in s.smooth_classifier.module.parameters())
    assert all(p.grad is None for p in embedded.guidance_classifier.parameters())


def test_elucd_is_per_sample_and_changes_the_images(embedded):
    s = CalibratedClassifierGuidance(embedded.guidance_classifier, scale=0.1)
    # The gradient of each sample is its own (batched convolutions differ from single ones by ~1e-6).
    x0, target = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([0, 1])
    alone_g = torch.cat([s.gradient(x0[i:i + 1], target[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(s.gradient(x0, target), alone_g, atol=1e-6, rtol=1e-4)
    # Through sampling: near convergence the gradient is small and its normalisation g / rms(g)
    # amplifies those float differences (5e-4 after 4 steps), so images agree to 1e-3, not 1e-5.
    both, _ = sample(embedded.pipe, s)
    alone = torch.cat([sample(embedded.pipe, s, labels=(lab,), seeds=(seed,))[0] for lab, seed in ((0, 3), (1, 4))])
    torch.testing.assert_close(both, alone, atol=1e-3, rtol=0)
    assert (both - sample(embedded.pipe)[0]).abs().max() > 1e-2


def test_elucd_on_a_latent_pipeline_decodes_with_the_vae_and_needs_a_target_for_text():
    pipe = build("dit")
    net = tiny_classifier(channels=3)
    s = CalibratedClassifierGuidance(net, scale=0.1, target=[1, 2])
    calls = {"n": 0}
    decode = pipe.vae.decode

    def counting_decode(*a, **k):
        calls["n"] += 1
        return decode(*a, **k)

    pipe.vae.decode = counting_decode
    with apply_guidance(pipe, s):
        out = pipe(**call_kwargs("dit"), generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(out).all() and calls["n"] == 3 + 1  # one per step, plus the pipeline's own
    sd = build("sd")
    with apply_guidance(sd, CalibratedClassifierGuidance(net, scale=0.1)):
        with pytest.raises(ValueError, match=r"target=None but this pipeline passes no class labels"):
            sd(**call_kwargs("sd"), generator=torch.Generator().manual_seed(0))


def test_configs_name_registered_classifiers():
    s = CalibratedClassifierGuidance("embedded-guidance", scale=0.2, tau2=0.0)
    again = from_config(s.to_config())
    assert again.to_config() == s.to_config() and again.tau2 == 0.0
    with pytest.raises(ValueError, match=r"cannot be serialised"):
        CalibratedClassifierGuidance(tiny_classifier()).to_config()
    with pytest.raises(ValueError, match=r"classifier='nope' is not a registered classifier name"):
        CalibratedClassifierGuidance("nope").image_classifier
    with pytest.raises(ValueError, match=r"tau2=-1 is out of range"):
        CalibratedClassifierGuidance("embedded-guidance", tau2=-1)


# --- GFCG -----------------------------------------------------------------------------------------------

def test_reference_and_adaptive_rules():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    target = torch.tensor([0, 0])
    ref, has = reference_class(probs, target, "most_probable_other")
    assert ref.tolist() == [1, 1] and has.tolist() == [True, True]
    ref2, has2 = reference_class(probs, target, "most_probable")
    assert ref2.tolist() == [0, 1] and has2.tolist() == [False, True]
    omega = adaptive_scale(probs, target, ref, has, 2.0, "confusion")
    torch.testing.assert_close(omega, torch.tensor([2 * 0.3 / 0.9, 2 * 0.5 / 0.7]))
    assert adaptive_scale(probs, target, ref2, has2, 2.0, "constant").tolist() == [0.0, 2.0]
    with pytest.raises(ValueError, match=r"reference='worst' is unknown"):
        GFCG("embedded-guidance", reference="worst")


def test_gfcg_with_a_classifier_sure_of_the_target_is_its_base_guidance(embedded):
    native, _ = sample(embedded.pipe, labels=(2, 7))
    s = GFCG(Constant([2, 7]), scale=3.0)
    counter = count_rows(embedded.pipe.unet)
    try:
        guided, nfe = sample(embedded.pipe, s, labels=(2, 7))
    finally:
        del embedded.pipe.unet.forward
    assert torch.equal(guided, native)
    assert nfe.tolist() == [8, 8] and counter["rows"] == 16
    assert torch.stack(s.reference_history).eq(-1).all()


def test_gfcg_reference_branch_runs_the_reference_class_in_the_same_batch(embedded):
    pipe = embedded.pipe
    s = GFCG(Constant(5), scale=1.5, adaptive="constant")  # always "sure" it is class 5
    seen = []
    original = s.combine

    def spy(ctx, preds):
        out = original(ctx, preds)
        seen.append((ctx.x.clone(), ctx.timestep, {k: v.clone() for k, v in preds.items()}, out.clone()))
        return out

    s.combine = spy
    counter = count_rows(pipe.unet)
    try:
        guided, nfe = sample(pipe, s, labels=(0, 5))
    finally:
        del pipe.unet.forward
    # step 0: no reference yet; then sample 0 (target 0) is pushed away from class 5, sample 1
    # (target 5) from the most probable other class, which Constant rates 0 -> class 0.
    assert nfe.tolist() == [2 + 3 * 3, 2 + 3 * 3] and counter["calls"] == 4 and counter["rows"] == 4 + 3 * 6
    assert torch.stack(s.reference_history)[1:].tolist() == [[5, 0]] * 3
    x, t, preds, out = seen[2]
    direct = pipe.unet(x, int(t), class_labels=torch.tensor([5, 0])).sample
    torch.testing.assert_close(preds[REF], direct, atol=1e-5, rtol=0)
    c, u, r = preds[COND], preds[UNCOND], preds[REF]
    torch.testing.assert_close(out, u + 3.0 * (c - u) + 1.5 * (c - r), atol=1e-5, rtol=1e-5)
    assert not torch.equal(guided, sample(pipe, labels=(0, 5))[0])


def test_gfcg_alone_skips_the_unconditional_pass_and_is_per_sample(embedded):
    s = GFCG(embedded.guidance_classifier, scale=2.0, inner=None)
    both, nfe = sample(embedded.pipe, s)
    assert all(n <= 4 + 3 for n in nfe.tolist())  # cond every step + a reference from step 1 on
    alone = torch.cat([sample(embedded.pipe, s, labels=(lab,), seeds=(seed,))[0] for lab, seed in ((0, 3), (1, 4))])
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=0)


def test_gfcg_on_a_text_pipeline_needs_the_reference_prompts():
    sd = build("sd")  # (the reference branch with class prompts: tests/test_gfcg_text.py)
    with apply_guidance(sd, GFCG(Constant(1, classes=3), scale=1.0, adaptive="constant", target=[0, 0])):
        with pytest.raises(ValueError, match=r"has no class ids, so the reference-class branch needs the reference"):
            sd(**call_kwargs("sd"), generator=torch.Generator().manual_seed(0))


def test_gfcg_on_dit_swaps_the_class_ids(embedded):
    pipe = build("dit")
    s = GFCG(Constant(3, classes=1000), scale=1.0, adaptive="constant")
    with apply_guidance(pipe, s) as handle:
        out = pipe(**call_kwargs("dit"), generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(out).all() and handle.nfe.tolist() == [2 + 2 * 3, 2 + 2 * 3]
    assert torch.stack(s.reference_history)[1:].eq(3).all()
    assert denoiser(pipe) is pipe.transformer


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DDIMScheduler"])
def test_x_t_step_rule_lands_where_a_step_from_the_shifted_sample_lands(scheduler):
    """The authors' EDM rule: x_t + lambda_i rms(x_t) g / rms(g), then the solver's step with the
    denoiser output held. Our returned prediction must make the scheduler land exactly there."""
    import diffusers

    from pipelines.parametrization import build_step_context, scheduler_parametrization

    sched = getattr(diffusers, scheduler)(beta_schedule="scaled_linear", clip_sample=False) \
        if scheduler == "DDIMScheduler" else getattr(diffusers, scheduler)(beta_schedule="scaled_linear")
    sched.set_timesteps(5)
    s = CalibratedClassifierGuidance(tiny_classifier(channels=4), scale=0.05, inner=None, target=[1, 2],
                                     step_rule="x_t", tau2=0.0)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g) * sched.init_noise_sigma
    call = {"step": 0, "num_steps": None, "scale": 3.0, "rescale": 0.0}
    for i, t in enumerate(sched.timesteps[:-1]):
        call["step"] = i
        model_input = sched.scale_model_input(latents, t)
        ctx = build_step_context(sched, call, model_input, t)
        cond = torch.randn(2, 4, 8, 8, generator=g)
        guided = s.combine(ctx, {"cond": cond})
        # Expected: shift x_t (VE units; DDIM's latents are VP: x_t * alpha), keep x0, step from there.
        x0 = ctx.to_x0(cond)
        g_hat = s.gradient(x0, torch.tensor([1, 2]))
        g_hat = g_hat / g_hat.pow(2).mean((1, 2, 3), keepdim=True).sqrt()
        alpha = ctx.param.alpha.float()
        x_ve = model_input / alpha
        delta_ve = s.step_weight(ctx) * x_ve.pow(2).mean((1, 2, 3), keepdim=True).sqrt() * g_hat
        delta = delta_ve if scheduler == "EulerDiscreteScheduler" else delta_ve * alpha
        probe = copy_of(sched)
        shifted = scheduler_parametrization(probe, t, probe.scale_model_input(latents + delta, t))
        expected = probe.step(shifted.from_x0(x0).float(), t, latents + delta).prev_sample
        got = copy_of(sched).step(guided, t, latents).prev_sample
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert (got - copy_of(sched).step(cond, t, latents).prev_sample).abs().max() > 1e-4  # it guides
        latents = sched.step(guided, t, latents).prev_sample


def copy_of(sched):
    import copy

    return copy.deepcopy(sched)


def test_presets_are_the_authors_setups_and_round_trip():
    edm = CalibratedClassifierGuidance.preset("edm", "embedded-guidance")
    assert (edm.step_rule, edm.tau2, edm.softplus_beta, edm.scale, edm.normalize) == ("x_t", 0.0, 5.0, 0.004, True)
    ddpm = CalibratedClassifierGuidance.preset("ddpm", "embedded-guidance", scale=2.0)
    assert (ddpm.step_rule, ddpm.tau2, ddpm.softplus_beta, ddpm.scale, ddpm.normalize) == ("x0", 0.5, 3.0, 2.0, False)
    assert guidance_from_config(edm.to_config()).to_config() == edm.to_config()
    with pytest.raises(ValueError, match="step_rule='x_t' normalises the gradient.*or step_rule='x0'"):
        CalibratedClassifierGuidance("embedded-guidance", normalize=False)  # the default rule is x_t
    default = CalibratedClassifierGuidance("embedded-guidance")  # measured no worse: elucd_step_rule results
    assert (default.step_rule, default.scale, default.normalize) == ("x_t", 0.01, True)
    assert ClassifierGuidance("embedded-guidance").step_rule == "x0"  # its score form is unnormalised
    with pytest.raises(ValueError, match="step_rule='xt' is unknown; allowed: x0, x_t"):
        CalibratedClassifierGuidance("embedded-guidance", step_rule="xt")


def guidance_from_config(config):
    from guidance import from_config

    return from_config(config)
