"""GFCG on text-to-image pipelines (tiny SD and SDXL): the reference branch is the conditional input with
the reference class's prompt, encoded once per call by the pipeline's own text encoders, its rows
appended to the same denoiser call."""

import pytest
import torch
from test_classifier_guidance import Constant
from tiny_pipelines import build, call_kwargs

from guidance import COND, GFCG, REF, UNCOND, ImageClassifier, from_config
from pipelines import apply_guidance
from pipelines.reference import TEXT_REFERENCE

NAMES = ["cat", "dog", "car"]
TEMPLATE = "a photo of a {}"
STEPS = 3  # call_kwargs' step count


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def tiny(request):
    return request.param, build(request.param)


def gfcg(**kw):
    # Constant is sure of class 2: target 0 is pushed away from 2 ("car"), target 2 from the most probable
    # other class, 0 ("cat"). adaptive="constant": omega = scale from step 1 on (no reference at step 0).
    return GFCG(Constant(2, classes=3), **{"scale": 1.5, "adaptive": "constant", "target": [0, 2],
                                           "class_names": NAMES, "prompt_template": TEMPLATE, **kw})


def generate(pipe, name, strategy=None, prompts=None, seeds=(3, 4)):
    kw = call_kwargs(name, batch_size=2)
    if prompts is not None:
        kw["prompt"] = list(prompts)
    kw["generator"] = [torch.Generator().manual_seed(s) for s in seeds]
    if strategy is None:
        return pipe(**kw).images, None
    with apply_guidance(pipe, strategy) as handle:
        images = pipe(**kw).images
    return images, handle


def record_forward(unet):
    """Wrap the UNet's forward (below the hook) to keep every call's inputs and output."""
    calls, original = [], unet.forward

    def recording(sample, timestep, encoder_hidden_states, **kwargs):
        out = original(sample, timestep, encoder_hidden_states, **kwargs)
        calls.append(dict(x=sample.clone(), t=timestep, ehs=encoder_hidden_states.clone(),
                          added=kwargs.get("added_cond_kwargs"), out=out[0].clone()))
        return out

    unet.forward = recording
    return calls


def class_inputs(pipe, name):
    """The three class prompts encoded as the pipeline does (one batch): (embeddings, pooled or None)."""
    prompts = [TEMPLATE.format(n) for n in NAMES]
    with torch.no_grad():
        if name == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
            return embeds, pooled
        return pipe.encode_prompt(prompts, "cpu", 1, False)[0], None


def test_reference_rows_get_the_reference_prompt_and_the_combine_is_gfcg(tiny):
    name, pipe = tiny
    s = gfcg()
    seen, original = [], s.combine

    def spy(ctx, preds):
        out = original(ctx, preds)
        seen.append(({k: v.clone() for k, v in preds.items()}, out.clone()))
        return out

    s.combine = spy
    calls = record_forward(pipe.unet)
    try:
        _, handle = generate(pipe, name, s)
    finally:
        del pipe.unet.forward
    # NFE: [uncond; cond] at step 0, plus one reference row per sample from step 1 on, in the same call
    assert handle.nfe.tolist() == [2 + 3 * (STEPS - 1)] * 2
    assert [c["x"].shape[0] for c in calls] == [4] + [6] * (STEPS - 1)
    assert torch.stack(s.reference_history)[1:].tolist() == [[2, 0]] * (STEPS - 1)
    embeds, pooled = class_inputs(pipe, name)
    for call in calls[1:]:
        cond, ref = slice(2, 4), slice(4, 6)  # rows: uncond, cond, then the appended reference rows
        assert torch.equal(call["ehs"][ref], embeds[[2, 0]])  # "a photo of a car", "a photo of a cat"
        assert torch.equal(call["x"][ref], call["x"][cond])
        if name == "sdxl":
            assert torch.equal(call["added"]["text_embeds"][ref], pooled[[2, 0]])
            assert torch.equal(call["added"]["time_ids"][ref], call["added"]["time_ids"][cond])
        # what the strategy received as REF is the denoiser's reference rows
    preds, out = seen[1]
    torch.testing.assert_close(preds[REF], calls[1]["out"][4:6], atol=0, rtol=0)
    # the reference rows alone, straight through the UNet (no hook), give the same prediction
    kw = {} if name == "sd" else {"added_cond_kwargs": {k: v[4:6] for k, v in calls[1]["added"].items()}}
    with torch.no_grad():
        direct = pipe.unet(calls[1]["x"][4:6], calls[1]["t"], embeds[[2, 0]], **kw)[0]
    torch.testing.assert_close(preds[REF], direct, atol=1e-5, rtol=1e-5)
    w = call_kwargs(name)["guidance_scale"]
    c, u, r = preds[COND], preds[UNCOND], preds[REF]
    torch.testing.assert_close(out, u + w * (c - u) + 1.5 * (c - r), atol=1e-5, rtol=1e-5)


def test_a_batch_equals_its_samples_alone_and_removal_is_bit_identical(tiny):
    name, pipe = tiny
    native, _ = generate(pipe, name)
    prompts = call_kwargs(name)["prompt"]
    both, _ = generate(pipe, name, gfcg(), prompts=prompts, seeds=(3, 4))
    alone = torch.cat([generate(pipe, name, gfcg(target=[t]), prompts=[p], seeds=(seed,))[0]
                       for p, t, seed in zip(prompts, (0, 2), (3, 4))])
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=0)
    assert not torch.equal(both, native)
    after, _ = generate(pipe, name)
    assert torch.equal(after, native)


def test_the_classifiers_class_names_are_used_and_configs_round_trip():
    pipe = build("sd")
    classifier = ImageClassifier(Constant(2, classes=3), class_names=NAMES)
    s = GFCG(classifier, scale=1.5, adaptive="constant", target=[0, 2], prompt_template=TEMPLATE)
    assert s.reference_prompts() == ["a photo of a cat", "a photo of a dog", "a photo of a car"]
    calls = record_forward(pipe.unet)
    try:
        generate(pipe, "sd", s)
    finally:
        del pipe.unet.forward
    assert torch.equal(calls[1]["ehs"][4:6], class_inputs(pipe, "sd")[0][[2, 0]])
    named = GFCG("embedded-guidance", class_names=NAMES, prompt_template=TEMPLATE, target=[1])
    assert from_config(named.to_config()).reference_prompts() == named.reference_prompts()


def test_clear_errors():
    with pytest.raises(ValueError, match=r"prompt_template='a photo of a' has no '\{\}' for the class name"):
        GFCG(Constant(2, classes=3), prompt_template="a photo of a")
    with pytest.raises(ValueError, match=r"class_names='cat' is invalid; allowed: None"):
        GFCG(Constant(2, classes=3), class_names="cat", prompt_template=TEMPLATE)
    pipe, kw = build("sd"), dict(call_kwargs("sd"), generator=torch.Generator().manual_seed(0))
    with apply_guidance(pipe, gfcg(prompt_template=None)):  # no template: no prompt for the reference class
        with pytest.raises(ValueError, match=r"reference class's prompt; pass prompt_template .* and class_names"):
            pipe(**kw)
    with apply_guidance(pipe, gfcg(class_names=None)):  # a bare module has no class names
        with pytest.raises(ValueError, match=r"needs class names: pass class_names=\[...\]"):
            pipe(**kw)
    with apply_guidance(pipe, gfcg(class_names=["cat", "dog"])):  # the classifier's class 2 has no name
        with pytest.raises(ValueError, match=r"reference class ids \[2\] are out of range for the 2 reference"):
            pipe(**kw)
    sd3 = build("sd3")
    with apply_guidance(sd3, gfcg()):
        with pytest.raises(NotImplementedError, match=r"StableDiffusion3Pipeline is neither"):
            sd3(**call_kwargs("sd3"))
    assert "StableDiffusionXLControlNetPipeline" not in TEXT_REFERENCE


def test_configs_without_the_text_options_are_unchanged():
    """Run folders and checkpoints compare strategy configs: a GFCG without class prompts keeps its old config."""
    config = GFCG("embedded-guidance", scale=2.0).to_config()
    assert set(config["params"]) == {"classifier", "scale", "reference", "adaptive", "inner", "target"}
    assert from_config(config).to_config() == config


@pytest.mark.parametrize("name", [n for n in TEXT_REFERENCE if "Img2Img" in n or "Inpaint" in n])
def test_img2img_and_inpainting_variants_swap_the_same_text_inputs(name):
    """The other classes of the table: same encode_prompt, same UNet keywords (inpainting: 9 input channels)."""
    import pipeline_zoo

    pipe = pipeline_zoo.build(name)
    base = "sdxl" if "XL" in name else "sd"
    calls = record_forward(pipe.unet)
    try:
        with apply_guidance(pipe, gfcg()) as handle:
            images = pipe(**pipeline_zoo.call_kwargs(name), generator=torch.Generator().manual_seed(0)).images
    finally:
        del pipe.unet.forward
    assert torch.isfinite(images).all()
    steps = len(calls)
    assert handle.nfe.tolist() == [2 + 3 * (steps - 1)] * 2 and [c["x"].shape[0] for c in calls[1:]] == [6] * (steps - 1)
    embeds, pooled = class_inputs(pipe, base)
    assert torch.equal(calls[1]["ehs"][4:6], embeds[[2, 0]]) and torch.equal(calls[1]["x"][4:6], calls[1]["x"][2:4])
    if pooled is not None:
        assert torch.equal(calls[1]["added"]["text_embeds"][4:6], pooled[[2, 0]])
