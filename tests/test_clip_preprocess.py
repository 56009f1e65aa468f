"""One CLIP preprocessing for the CLIP score `evaluation` reports and the CLIP evaluator DynamicCFG steers by
(`guidance.evaluators.clip_preprocess`), checked on a randomly initialised tiny open_clip model (offline)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from guidance.evaluators import CLIPEvaluator, clip_preprocess, clip_preprocess_config

TEXTS = ["a photo of a cat", "a photo of a dog", "a red boat"]
# Not open_clip's defaults, so a path that ignores the model's config (as the CLIP evaluator once did) shows.
PREPROCESS = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """(model name, weights file): a tiny open_clip model registered from a config, saved as safetensors."""
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("clip")
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                                "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / "Tiny-preprocess-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    torch.manual_seed(3)
    save_file(open_clip.create_model("Tiny-preprocess-test", pretrained=None).state_dict(), folder / "tiny.safetensors")
    return "Tiny-preprocess-test", folder / "tiny.safetensors"


def images_uint8(kind: str, h: int, w: int, seed: int = 0) -> torch.Tensor:
    if kind == "noise":  # the worst case for resampling: every pixel independent
        return torch.randint(0, 256, (3, 3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    smooth = torch.stack([torch.stack([yy, xx, (yy + xx) / 2]), torch.stack([xx, 1 - yy, yy * xx]),
                          torch.stack([(xx * 6).sin() / 2 + 0.5, yy.square(), 1 - xx * yy])])
    return (smooth * 255).round().byte()


def _recording(model):
    """Wrap encode_image to keep what each path feeds the model and what it gets back."""
    seen, original = [], model.encode_image

    def encode_image(pixels, *args, **kwargs):
        out = original(pixels, *args, **kwargs)
        seen.append((pixels.detach().clone(), out.detach().clone()))
        return out

    model.encode_image = encode_image
    return seen


def test_the_score_and_the_evaluator_see_the_same_pixels_and_embeddings(tiny_open_clip):
    """evaluation's CLIP score (uint8 images) and DynamicCFG's CLIP evaluator (x0 in [-1, 1]) feed the model
    the same preprocessed pixels, with the model's own mean / std, and get the same embeddings and cosines."""
    from evaluation import OpenClipBackend, clip_scores

    name, weights = tiny_open_clip
    backend = OpenClipBackend(name, pretrained=weights, force_preprocess_cfg=PREPROCESS)  # as a tag would set it
    config = clip_preprocess_config(backend.model)
    assert config["mean"] == tuple(PREPROCESS["mean"]) and config["std"] == tuple(PREPROCESS["std"])
    assert config["size"] == (32, 32)
    seen = _recording(backend.model)
    evaluator = CLIPEvaluator(backend.model, backend.tokenizer, decode=lambda x: x)
    for kind, (h, w) in [("smooth", (48, 64)), ("noise", (32, 32)), ("noise", (80, 56))]:
        images = images_uint8(kind, h, w)
        seen.clear()
        scores = clip_scores(backend, images, TEXTS)
        x0 = images.float() / 127.5 - 1  # the evaluator's input: a pixel model's x0
        cosines = evaluator(x0, torch.zeros(3), TEXTS)
        (pixels_score, emb_score), (pixels_guide, emb_guide) = seen
        torch.testing.assert_close(pixels_guide, pixels_score, atol=2e-6, rtol=0)  # (u/127.5 - 1 + 1)/2 vs u/255
        torch.testing.assert_close(emb_guide, emb_score, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(100 * cosines.double().clamp_min(0), scores, atol=1e-3, rtol=0)
        expected = clip_preprocess(images.float() / 255, **config)
        torch.testing.assert_close(pixels_score, expected, atol=0, rtol=0)


@pytest.mark.parametrize("kind, size, max_tol, mean_tol", [
    ("smooth", (48, 64), 0.03, 0.01),  # measured: max 0.016, mean 0.004 (ViT-B-32's mean / std)
    ("smooth", (300, 300), 0.03, 0.01),  # downscaling: max 0.014, mean 0.003
    ("noise", (32, 32), 0.45, 0.01),  # measured: max 0.34, mean 0.005
    ("noise", (512, 384), 0.2, 0.01),  # measured: max 0.10, mean 0.004
])
def test_the_tensor_path_matches_open_clips_pil_transform(kind, size, max_tol, mean_tol):
    """ViT-B-32's own eval transform (PIL) against ours on the same uint8 images. Same geometry (short side to
    224, centre crop) and kernel (antialiased bicubic, a = -0.5); PIL rounds to uint8 between its two
    passes and after them, which is all that differs: on smooth images at most ~4/255 of a pixel before
    normalisation; on per-pixel noise, where bicubic overshoot is clipped between passes, up to ~23/255 in a
    few pixels, the mean staying ~1/255. Units: after mean / std normalisation."""
    import open_clip
    from PIL import Image

    model, _, transform = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    images = images_uint8(kind, *size)
    theirs = torch.stack([transform(Image.fromarray(i.permute(1, 2, 0).numpy())) for i in images])
    ours = clip_preprocess(images.float() / 255, **clip_preprocess_config(model))
    assert ours.shape == theirs.shape == (3, 3, 224, 224)
    diff = (ours - theirs).abs()
    assert diff.max() < max_tol and diff.mean() < mean_tol
    # Rounding our output to uint8 steps removes most of the smooth-image difference: the kernels agree.
    if kind == "smooth":
        config = clip_preprocess_config(model)
        m, s = torch.tensor(config["mean"]).view(1, 3, 1, 1), torch.tensor(config["std"]).view(1, 3, 1, 1)
        assert ((((ours * s + m) * 255).round() / 255 - m) / s - theirs).abs().mean() < diff.mean() / 2


def test_embeddings_through_the_pil_transform_agree_closely(tiny_open_clip):
    """On the tiny model: image embeddings from open_clip's PIL transform and from ours, cosine >= 0.999."""
    import open_clip
    from PIL import Image

    name, weights = tiny_open_clip
    mean_std = {"image_mean": PREPROCESS["mean"], "image_std": PREPROCESS["std"]}
    model, _, transform = open_clip.create_model_and_transforms(name, pretrained=str(weights), **mean_std)
    for images in (images_uint8("smooth", 48, 64), images_uint8("noise", 40, 40)):
        with torch.no_grad():
            theirs = model.encode_image(torch.stack([transform(Image.fromarray(i.permute(1, 2, 0).numpy()))
                                                     for i in images]))
            ours = model.encode_image(clip_preprocess(images.float() / 255, **clip_preprocess_config(model)))
        assert F.cosine_similarity(ours, theirs).min() > 0.999  # measured: 1 - cos <= 1.2e-6


def test_clip_preprocess_refuses_what_it_does_not_implement():
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="resize_mode='longest'.*allowed: shortest, squash"):
        clip_preprocess(x, 4, resize_mode="longest")
    with pytest.raises(ValueError, match="interpolation='nearest'"):
        clip_preprocess(x, 4, interpolation="nearest")
    with pytest.raises(ValueError, match=r"images of shape \(3, 8, 8\)"):
        clip_preprocess(x[0], 4)
    assert clip_preprocess(x, (4, 6), resize_mode="squash").shape == (1, 3, 4, 6)
