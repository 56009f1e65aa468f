"""Tiny pipelines on UnCLIPScheduler for tests/test_pipeline_zoo.py (rows in pipelines/adapters.py's unCLIP block):
the Kandinsky 2.1 / 2.2 priors (a PriorTransformer predicting x0 of a CLIP image embedding), unCLIP's image
variation (a learned-variance decoder) and unCLIP itself (the prior, then the decoder, each with its own scale).

Configs follow diffusers' own tests (tests/pipelines/kandinsky, kandinsky2_2, unclip), shrunk; the CLIP text encoder
and tokenizer are the tiny SDXL pipeline's second pair (32-d projection, offline). Builders use pipeline_zoo's
helpers (imported as `zoo`, used inside functions only: pipeline_zoo imports this module at its end).
"""

from __future__ import annotations

import functools

import torch

import diffusers
import pipeline_zoo as zoo  # noqa: F401  (helpers: zoo._make, zoo._init, zoo._image, ...)
import tiny_pipelines as tp

EMBED = 32  # the CLIP embedding width: prior embedding_dim, text and image projections


@functools.cache
def _prior() -> torch.nn.Module:
    # zoo._init re-draws the zero-initialised clip_std / prd_embedding, so the output is not a constant
    return zoo._init(diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=EMBED,
                                                num_layers=1), 401)


@functools.cache
def _image_encoder() -> torch.nn.Module:
    import zoo_unet

    return zoo_unet._clip_vision(EMBED)


def _text_parts() -> dict:
    sdxl = zoo._sdxl_parts()
    return dict(text_encoder=sdxl["text_encoder_2"], tokenizer=sdxl["tokenizer_2"])


def _prior_scheduler() -> diffusers.UnCLIPScheduler:
    return diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                     num_train_timesteps=1000, clip_sample=True, clip_sample_range=10.0)


def kandinsky_prior(cls_name: str = "KandinskyV22PriorPipeline"):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(crop_size=32, size=32, do_resize=True, do_center_crop=True)
    return zoo._make(cls_name, prior=_prior(), image_encoder=_image_encoder(), scheduler=_prior_scheduler(),
                     image_processor=processor, **_text_parts())


def kandinsky_prior_kwargs(emb2emb: bool = False) -> dict:
    # no negative_prompt: with one the prior runs on prompt + negative_prompt (2B samples) and returns B of them
    kw = dict(prompt=tp.PROMPTS, guidance_scale=4.0, num_inference_steps=zoo.STEPS, output_type="pt")
    if emb2emb:  # image embeddings passed as the image (strength 0.75 of 4 steps: 3 run)
        kw.update(image=zoo._embeds(zoo.BATCH, EMBED, seed=402), strength=0.75, num_inference_steps=4)
    return kw


# --- unCLIP: a learned-variance decoder (3 -> 6 channels) and super-resolution UNets -----------------------
@functools.cache
def _decoder() -> torch.nn.Module:
    return zoo._init(diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=6, down_block_types=("ResnetDownsampleBlock2D",
                                                                         "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=48, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
        class_embed_type="identity"), 403)


@functools.cache
def _text_proj() -> torch.nn.Module:
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    return zoo._init(UnCLIPTextProjModel(clip_extra_context_tokens=2, clip_embeddings_dim=EMBED, time_embed_dim=128,
                                         cross_attention_dim=48), 404)


class _PassThroughSuperRes(diffusers.UNet2DModel):
    """A stand-in super-resolution UNet: it predicts the noise whose x0 (at its UnCLIPScheduler's timestep) is the
    upscaled decoder image, so the pipeline returns the decoder's image. Random super-resolution UNets saturate
    nearly every pixel to 0 or 1, which would hide the decoder (the stage is never guided)."""

    def forward(self, sample, timestep, return_dict: bool = True, **kwargs):
        x, upscaled = sample.chunk(2, dim=1)
        abar = diffusers.UnCLIPScheduler().alphas_cumprod[int(timestep)].to(x)
        eps = (x - abar.sqrt() * upscaled) / (1 - abar).sqrt()
        return diffusers.models.unets.unet_2d.UNet2DOutput(sample=eps) if return_dict else (eps,)


@functools.cache
def _super_res() -> torch.nn.Module:
    return _PassThroughSuperRes(sample_size=32, layers_per_block=1, block_out_channels=(4,), norm_num_groups=4,
                                down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), add_attention=False,
                                in_channels=6, out_channels=3).eval()


def _unclip(cls_name: str):
    parts = dict(decoder=_decoder(), text_proj=_text_proj(), super_res_first=_super_res(), super_res_last=_super_res(),
                 decoder_scheduler=diffusers.UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
                 super_res_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log",
                                                               prediction_type="epsilon"), **_text_parts())
    if cls_name == "UnCLIPPipeline":
        parts.update(prior=_prior(), prior_scheduler=_prior_scheduler())
    else:
        from transformers import CLIPImageProcessor

        parts.update(image_encoder=_image_encoder(), feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
    pipe = zoo._make(cls_name, **parts)
    # unCLIP returns numpy or PIL images only: its "pil" output as the float tensor, for the tests' comparisons
    pipe.numpy_to_pil = lambda images: torch.from_numpy(images)
    return pipe


def unclip_kwargs(variation: bool = False) -> dict:
    kw = dict(decoder_num_inference_steps=zoo.STEPS, super_res_num_inference_steps=2, decoder_guidance_scale=8.0,
              output_type="pil")
    if variation:
        return {**kw, "image": zoo._image(32, seed=407)}
    # each stage guided with its own scale
    return {**kw, "prompt": tp.PROMPTS, "prior_num_inference_steps": zoo.STEPS, "prior_guidance_scale": 4.0}


CASES: dict = {
    "KandinskyPriorPipeline": zoo._case(lambda: kandinsky_prior("KandinskyPriorPipeline"), kandinsky_prior_kwargs),
    "KandinskyV22PriorPipeline": zoo._case(lambda: kandinsky_prior("KandinskyV22PriorPipeline"),
                                           kandinsky_prior_kwargs),
    "KandinskyV22PriorEmb2EmbPipeline": zoo._case(lambda: kandinsky_prior("KandinskyV22PriorEmb2EmbPipeline"),
                                                  lambda: kandinsky_prior_kwargs(emb2emb=True)),
    "UnCLIPImageVariationPipeline": zoo._case(lambda: _unclip("UnCLIPImageVariationPipeline"),
                                              lambda: unclip_kwargs(variation=True)),
    "UnCLIPPipeline": zoo._case(lambda: _unclip("UnCLIPPipeline"), unclip_kwargs),
}
