"""Tiny pipelines of HiDream-I1 and Shap-E img2img for tests/test_pipeline_zoo.py (rows in pipelines/adapters.py's
"HiDream and Shap-E img2img" block).

Builders use pipeline_zoo's helpers (imported as `zoo`, used inside functions only: pipeline_zoo imports
this module at its end) and cache shared components with functools.cache.
"""

from __future__ import annotations

import functools

import torch

import diffusers
import pipeline_zoo as zoo  # noqa: F401  (helpers: zoo._make, zoo._new, zoo._text, zoo._latent_call, ...)

# HiDream's Llama-3 embeddings are (layers, batch, tokens, dim). Four layers = the [uncond; cond] batch of 2 x 2:
# a hook that selected their rows on dimension 0 (as it does for other tensors) would pick layers, not samples.
HIDREAM_LLAMA_LAYERS = 4


# --- HiDream-I1: [uncond; cond] in one call, Llama-3 embeddings batched on dimension 1, negated output ----------
@functools.cache
def _hidream_transformer() -> torch.nn.Module:
    # diffusers' own test config (tests/pipelines/hidream_image), llama layers 1 and 3 of the four given
    return zoo._init(diffusers.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[32, 16], text_emb_dim=64, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(1, 3)), 701)


def hidream(scheduler=None):
    """The tiny HiDream pipeline (no text encoders: prompt embeddings are given; no VAE: latent output).

    Its default size is 128 latent pixels a side whatever the VAE (the call rescales height and width to that
    area): the instance's `default_sample_size` is set to 16 (16 x 16 latents, 64 tokens) to keep it tiny."""
    pipe = zoo._make("HiDreamImagePipeline", transformer=_hidream_transformer(),
                     scheduler=scheduler or diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    pipe.default_sample_size = 16
    return pipe


def hidream_kwargs(batch: int = zoo.BATCH) -> dict:
    kw = {}
    for prefix, seed in (("", 711), ("negative_", 721)):
        kw[f"{prefix}prompt_embeds_t5"] = zoo._embeds(batch, 6, 32, seed=seed)
        kw[f"{prefix}prompt_embeds_llama3"] = zoo._embeds(HIDREAM_LLAMA_LAYERS, batch, 5, 16, seed=seed + 1)
        kw[f"{prefix}pooled_prompt_embeds"] = zoo._embeds(batch, 64, seed=seed + 2)
    return zoo._latent_call(guidance_scale=4.0, **kw)


# --- Shap-E img2img: the Shap-E prior (learned variance on the last axis) on CLIP image tokens ------------------
@functools.cache
def _shap_e_image_encoder() -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    # 8 x 8 images in 4 x 4 patches: 4 image tokens of the prior's embedding_proj_dim (16)
    return zoo._init(zoo._new(lambda: CLIPVisionModel(CLIPVisionConfig(
        hidden_size=16, image_size=8, patch_size=4, projection_dim=16, intermediate_size=37, num_attention_heads=4,
        num_channels=3, num_hidden_layers=2)), 731), 732)


def shap_e_img2img():
    import zoo_cascades

    parts = zoo_cascades._shap_e_parts()
    return zoo._make("ShapEImg2ImgPipeline", prior=parts["prior"], image_encoder=_shap_e_image_encoder(),
                     shap_e_renderer=parts["shap_e_renderer"], scheduler=parts["scheduler"])


def shap_e_img2img_kwargs() -> dict:
    return dict(image=zoo._image(size=8, seed=741), guidance_scale=4.0, num_inference_steps=zoo.STEPS,
                frame_size=8, output_type="latent")


CASES: dict = {
    "HiDreamImagePipeline": zoo._case(hidream, hidream_kwargs),
    "ShapEImg2ImgPipeline": zoo._case(shap_e_img2img, shap_e_img2img_kwargs),
}
