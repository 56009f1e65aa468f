"""The boundary: guidance/ sees a plain CallDescription, never a pipeline object or a pipelines/ path;
Dynamic CFG picks its evaluators per pipeline kind; explicit from_config registration."""

import ast
from pathlib import Path

import pytest
import torch
from tiny_pipelines import build, call_kwargs

import guidance
from guidance import CFG, DynamicCFG
from guidance.call import CallDescription
from guidance.evaluators import NAMED_EVALUATORS, CLIPEvaluator, register_evaluator
from pipelines import apply_guidance, load_embedded

GUIDANCE = Path(guidance.__file__).parent


def test_guidance_never_imports_diffusers_or_pipelines_nor_names_their_paths():
    for path in GUIDANCE.glob("*.py"):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("diffusers", "pipelines") for n in names), (path.name, names)
        assert '"pipelines"' not in source and "pipelines/embedded" not in source, path.name
        assert "def vae_decoder" not in source and "pipe." not in source and "getattr(pipe" not in source, path.name


class Spy(CFG):
    def on_call(self, call):
        self.call = call
        super().on_call(call)


@pytest.mark.parametrize("negative", [False, True])
def test_on_call_receives_a_plain_description(negative):
    pipe = build("sd")
    spy = Spy()
    with apply_guidance(pipe, spy):
        pipe(**call_kwargs("sd", negative_prompt=negative), generator=torch.Generator().manual_seed(0))
    call = spy.call
    assert isinstance(call, CallDescription)
    assert (call.pipeline, call.scheduler_class, call.num_inference_steps, call.layout, call.conditioning) == (
        "StableDiffusionPipeline", "DDIMScheduler", 3, "uncond_cond", "text")
    assert call.negative_prompt is negative and call.dtype == torch.float32
    assert call.prompts == tuple(call_kwargs("sd")["prompt"]) and call.scheduler_config["prediction_type"] == "epsilon"
    images = call.decode(torch.zeros(1, 4, 16, 16))  # the VAE decode, built by pipelines/
    assert images.shape == (1, 3, 32, 32)
    dit = build("dit")
    with apply_guidance(dit, spy):
        dit(**call_kwargs("dit"), generator=torch.Generator().manual_seed(0))
    assert (spy.call.conditioning, spy.call.layout, spy.call.prompts) == ("class", "cond_uncond", None)


def tiny_clip():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                                                  image_size=32),
                           text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    return model, open_clip.get_tokenizer("ViT-B-32")


def test_dynamic_cfg_defaults_per_pipeline_kind():
    embedded = load_embedded("cpu").pipe
    dyn = DynamicCFG()
    with apply_guidance(embedded, dyn):
        embedded([0, 1], guidance_scale=3.0, num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0))
    assert [e.name for e in dyn._loaded] == ["alignment", "quality"]
    sd = build("sd")
    with apply_guidance(sd, DynamicCFG()), pytest.raises(ValueError, match="text-to-image .* CLIP evaluator"):
        sd(**call_kwargs("sd"))
    dit = build("dit")
    with apply_guidance(dit, DynamicCFG()), pytest.raises(ValueError, match="no evaluators are registered for DiT"):
        dit(**call_kwargs("dit"))
    model, tokenizer = tiny_clip()
    clip = CLIPEvaluator(model, tokenizer)
    encoded = []
    original = model.encode_text
    model.encode_text = lambda tokens: (encoded.append(len(tokens)), original(tokens))[1]
    register_evaluator("clip", lambda device: clip)
    try:
        dyn = DynamicCFG(scales=[1.0, 7.5])
        with apply_guidance(sd, dyn):
            images = sd(**call_kwargs("sd"), generator=torch.Generator().manual_seed(0)).images
    finally:
        del NAMED_EVALUATORS["clip"]
    assert torch.isfinite(images).all() and dyn.history.shape == (2, 3)
    assert clip.decode is not None  # the call's VAE decode: CLIP judges images, not latents
    assert encoded == [2]  # each prompt's text features computed once for the whole call (3 steps)


def test_signed_weights_are_the_papers_eq7():
    def a(x, t, c):
        return x.flatten(1).mean(1)

    def b(x, t, c):
        return x.flatten(1).std(1)

    dyn = DynamicCFG(scales=[1.0, 2.0], evaluators=[a, b], weighting="signed")
    scores = torch.tensor([[[1.0, -3.0]], [[2.0, -5.0]]])  # (K=2, B=1, E=2): means 1.5 and -4
    dyn._prev = torch.tensor([[3.0, -2.0]])
    # (1.5 - 3) / 3 = -0.5 (a fell), (-4 - -2) / -2 = 1.0
    torch.testing.assert_close(dyn.evaluator_weights(scores), torch.tensor([[-0.5, 1.0]]))
    dyn._prev = torch.tensor([[0.0, -2.0]])  # |e_{t+1}| floored at eps = 0.1
    torch.testing.assert_close(dyn.evaluator_weights(scores), torch.tensor([[15.0, 1.0]]))


def test_a_user_class_named_like_ours_does_not_replace_it():
    class CFG(guidance.GuidanceStrategy):  # noqa: F811  (a user's own class with our name)
        def __init__(self, scale=None, guidance_rescale=None):
            pass

    rebuilt = guidance.from_config({"name": "CFG", "params": {"scale": 2.0}})
    assert type(rebuilt) is guidance.CFG and rebuilt.scale == 2.0
    with pytest.raises(ValueError, match="already registered"):
        guidance.register_strategy(CFG)
