"""The embedded default model: offline loading, determinism, save/load, every strategy on it."""

import pytest
import torch
from diffusers import DDIMScheduler

import guidance
from guidance import REGISTRY, GuidanceStrategy
from pipelines import apply_guidance, load_embedded
from pipelines.embedded import CIFAR10_CLASSES, ClassConditionalPipeline
from pipelines.guide import uses_guide_model


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_embedded("cpu")


def sample(pipe, labels=(0, 1, 2, 3), steps=5, seed=0, **kw):
    return pipe(class_labels=list(labels), num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(seed), **kw).images


def one_of_each(steps: int = 5) -> dict[str, GuidanceStrategy]:
    """A default instance of every registered strategy (wrappers wrap CFG; strategies that need
    fitted data, such as LinearAG, come from their `unfitted(steps, inner)` constructor)."""
    out = {}
    for name, cls in REGISTRY.items():
        if hasattr(cls, "unfitted"):
            out[name] = cls.unfitted(steps, guidance.CFG())
        elif "classifier" in cls.config_fields:
            out[name] = cls("embedded-guidance")  # the shipped guidance classifier, by its registered name
        elif name == "PerpNeg":
            out[name] = cls(negative_prompt="a blurry photo")  # refused here: it needs prompts
        else:
            out[name] = cls(inner=guidance.CFG()) if "inner" in cls.config_fields else cls()
    return out


def test_loads_offline_and_samples_deterministically(model, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    again = load_embedded("cpu")
    a, b = sample(model.pipe), sample(again.pipe)
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, sample(model.pipe, seed=1))
    assert model.class_names == CIFAR10_CLASSES
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model.eval_classifier(x).shape == (2, 10) and model.guidance_classifier(x).shape == (2, 10)


def test_save_pretrained_round_trip(model, tmp_path):
    model.pipe.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = ClassConditionalPipeline.from_pretrained(tmp_path, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert torch.equal(sample(reloaded), sample(model.pipe))
    assert reloaded.config.class_names == CIFAR10_CLASSES


def test_class_names_and_bad_labels(model):
    assert torch.equal(sample(model.pipe, labels=("airplane", "automobile")), sample(model.pipe, labels=(0, 1)))
    with pytest.raises(ValueError, match=r"class_labels: 10 is out of range; allowed: integers in \[0, 9\]"):
        sample(model.pipe, labels=(10,))
    with pytest.raises(ValueError, match="'unicorn' is not a class name"):
        sample(model.pipe, labels=("unicorn",))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "3", None])
def test_non_finite_guidance_scale_is_refused_natively_and_through_the_hook(model, scale):
    with pytest.raises(ValueError, match=r"guidance_scale=.* allowed: a finite number"):
        model.pipe(class_labels=[0], guidance_scale=scale, num_inference_steps=2, output_type="pt")
    # Through the hook None reads as "guidance off" and gets that refusal; the others are not numbers.
    expected = "runs no unconditional branch" if scale is None else "; allowed: a finite number"
    with apply_guidance(model.pipe, guidance.CFG()), pytest.raises(ValueError, match=expected):
        model.pipe(class_labels=[0], guidance_scale=scale, num_inference_steps=2, output_type="pt")


def test_nan_latents_are_refused_before_sampling(model):
    latents = torch.randn(1, 3, 32, 32)
    latents[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="latents contains NaN or inf"):
        model.pipe(class_labels=[0], num_inference_steps=2, latents=latents, output_type="pt")


def test_every_strategy_runs_on_the_embedded_model(model):
    strategies = one_of_each()
    assert set(strategies) == set(REGISTRY)
    native = sample(model.pipe, guidance_scale=3.0)
    default_scheduler = model.pipe.scheduler
    with apply_guidance(model.pipe, strategies.pop("PerpNeg")), pytest.raises(ValueError, match="needs a text-to-image"):
        sample(model.pipe, guidance_scale=3.0)
    for name in ("SLG", "SEG", "SAG"):  # transformer blocks / a cross-attention mid block: UNet2DModel refused by name
        with pytest.raises(ValueError, match="UNet2DModel"):
            apply_guidance(model.pipe, strategies.pop(name))
    with pytest.raises(NotImplementedError, match="NAG runs on FluxPipeline.*ClassConditionalPipeline is not one"):
        apply_guidance(model.pipe, strategies.pop("NAG"))  # joint text-image attention only
    for name, strategy in strategies.items():
        guide = model.pipe.unet if uses_guide_model(strategy) else None  # Autoguidance: the model guides itself
        if name == "CFGPlusPlus":  # refuses a DDIM that clips x0 (tested in test_field_rules): this one does not
            model.pipe.scheduler = DDIMScheduler.from_config(default_scheduler.config, clip_sample=False)
        with apply_guidance(model.pipe, strategy, guide_model=guide) as handle:
            images = sample(model.pipe, guidance_scale=3.0)
        model.pipe.scheduler = default_scheduler
        assert torch.isfinite(images).all() and images.shape == native.shape, name
        assert handle.nfe is not None and int(handle.nfe.min()) >= 5, name
    with apply_guidance(model.pipe, guidance.CFG()):
        assert (sample(model.pipe, guidance_scale=3.0) - native).abs().max() <= 1e-5


@pytest.mark.parametrize("scheduler", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_any_diffusers_scheduler(scheduler):
    m = load_embedded("cpu", scheduler=scheduler)
    assert type(m.pipe.scheduler).__name__ == scheduler
    with apply_guidance(m.pipe, guidance.APG()):
        assert torch.isfinite(sample(m.pipe)).all()
    with pytest.raises(ValueError, match="not a diffusers scheduler"):
        load_embedded("cpu", scheduler="Nope")


def test_euler_first_call_starts_from_this_calls_noise_level():
    m = load_embedded("cpu", scheduler="EulerDiscreteScheduler")
    first = sample(m.pipe, steps=5, guidance_scale=3.0)  # init_noise_sigma must follow this call's sigmas
    sample(m.pipe, steps=12, guidance_scale=3.0)
    again = sample(m.pipe, steps=5, guidance_scale=3.0)
    assert torch.equal(first, again)


def test_callback_on_step_end_sees_and_replaces_the_latents(model):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(tensors["latents"].clone())
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 3 else {}

    images = sample(model.pipe, steps=4, guidance_scale=3.0, callback_on_step_end=callback)
    assert len(seen) == 4 and seen[0].shape == (4, 3, 32, 32)
    assert torch.equal(images, torch.full_like(images, 0.5))  # zero latents at the end -> mid-grey
