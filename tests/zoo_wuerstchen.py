"""Tiny Würstchen and Stable Cascade pipelines for tests/test_pipeline_zoo.py (rows in pipelines/adapters.py's
Würstchen block) and tests/test_wuerstchen.py (their combined pipelines, Stable Cascade under other schedulers).

Both families guide as torch.lerp(u, c, s) on [cond; uncond] and pass their denoiser a timestep ratio in [0, 1].
Configs after diffusers' own tests (tests/pipelines/wuerstchen, tests/pipelines/stable_cascade), smaller, with the
effnet conditioning on in the decoders so that the image embeddings reach the output. Builders use pipeline_zoo's
helpers (imported as `zoo`, used inside functions only: pipeline_zoo imports this module at its end).
"""

from __future__ import annotations

import functools

import torch

import diffusers
import pipeline_zoo as zoo  # noqa: F401  (helpers: zoo._make, zoo._init, zoo._embeds, ...)
import tiny_pipelines as tp

_EFFNET = 16  # channels of the prior's image embeddings (the decoders' effnet input)


@functools.cache
def _text(projection: bool) -> tuple:
    """A CLIP tokenizer and text encoder (with projection for Stable Cascade, which reads its pooled text_embeds)."""
    tokenizer = tp.clip_tokenizer()
    return tokenizer, zoo._new(lambda: tp._clip_text(tokenizer, hidden=32, projection_dim=32 if projection else None),
                               701 + projection)


# --- Würstchen: WuerstchenPrior (x, r, c) and WuerstchenDiffNeXt (x, r, effnet, clip) -------------------------------
@functools.cache
def _wuerstchen_models() -> tuple:
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

    prior = zoo._new(lambda: WuerstchenPrior(c_in=_EFFNET, c=16, depth=2, c_cond=32, c_r=8, nhead=2), 711)
    decoder = zoo._init(WuerstchenDiffNeXt(
        c_in=4, c_out=4, c_r=8, c_cond=32, c_hidden=[16, 32], nhead=[-1, 2], blocks=[1, 1], level_config=["CT", "CTA"],
        inject_effnet=[False, True], effnet_embd=_EFFNET, clip_embd=32), 712)
    vqgan = zoo._new(lambda: PaellaVQModel(bottleneck_blocks=1, embed_dim=16, num_vq_embeddings=2), 713)
    return prior, decoder, vqgan


@functools.cache
def _cascade_models() -> tuple:
    prior = zoo._init(diffusers.StableCascadeUNet(
        in_channels=_EFFNET, out_channels=_EFFNET, timestep_ratio_embedding_dim=16, conditioning_dim=32,
        block_out_channels=(32, 32), num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1), switch_level=(False,), clip_image_in_channels=16, clip_text_in_channels=32,
        clip_text_pooled_in_channels=32, dropout=(0.0, 0.0)), 721)
    decoder = zoo._init(diffusers.StableCascadeUNet(
        in_channels=4, out_channels=4, timestep_ratio_embedding_dim=16, conditioning_dim=32,
        block_out_channels=(16, 32), num_attention_heads=(-1, 2), down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1), down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(2, 1),
        block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock"),
                               ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")),
        switch_level=None, clip_text_pooled_in_channels=32, effnet_in_channels=_EFFNET, dropout=(0.0, 0.0)), 722)
    return prior, decoder


def _stage(cls_name: str, prior, decoder, vqgan, text: tuple, scheduler=None):
    """A prior, decoder or combined pipeline of the family (names ending in Prior / Decoder / Combined)."""
    tokenizer, encoder = text
    scheduler = scheduler or diffusers.DDPMWuerstchenScheduler()
    if cls_name.endswith("PriorPipeline"):
        return zoo._make(cls_name, prior=prior, tokenizer=tokenizer, text_encoder=encoder, scheduler=scheduler)
    if cls_name.endswith("DecoderPipeline"):
        return zoo._make(cls_name, decoder=decoder, tokenizer=tokenizer, text_encoder=encoder, vqgan=vqgan,
                         scheduler=scheduler, latent_dim_scale=4.0)
    return zoo._make(cls_name, decoder=decoder, tokenizer=tokenizer, text_encoder=encoder, vqgan=vqgan,
                     scheduler=scheduler, prior_prior=prior, prior_tokenizer=tokenizer, prior_text_encoder=encoder,
                     prior_scheduler=diffusers.DDPMWuerstchenScheduler())


def wuerstchen(cls_name: str, scheduler=None):
    return _stage(cls_name, *_wuerstchen_models(), _text(False), scheduler)


def cascade(cls_name: str, scheduler=None):
    return _stage(cls_name, *_cascade_models(), _wuerstchen_models()[2], _text(True), scheduler)


def prior_kwargs() -> dict:
    return dict(prompt=tp.PROMPTS, negative_prompt=tp.NEGATIVE_PROMPTS, height=256, width=256, guidance_scale=4.0,
                num_inference_steps=zoo.STEPS, output_type="pt")


def decoder_kwargs(cascade_decoder: bool) -> dict:
    """Two image embeddings: Würstchen's decoder repeats its prompt per embedding (one prompt); Stable Cascade's takes
    one prompt per embedding."""
    prompts = dict(prompt=tp.PROMPTS, negative_prompt=tp.NEGATIVE_PROMPTS) if cascade_decoder else \
        dict(prompt=tp.PROMPTS[0], negative_prompt=tp.NEGATIVE_PROMPTS[0])
    return dict(image_embeddings=zoo._embeds(zoo.BATCH, _EFFNET, 4, 4, seed=731), guidance_scale=3.0,
                num_inference_steps=zoo.STEPS, output_type="latent", **prompts)


def combined_kwargs() -> dict:
    """One prompt, two images (Würstchen's decoder stage repeats its prompt per image embedding)."""
    return dict(prompt=tp.PROMPTS[0], negative_prompt=tp.NEGATIVE_PROMPTS[0], num_images_per_prompt=zoo.BATCH,
                height=128, width=128, prior_guidance_scale=4.0, prior_num_inference_steps=zoo.STEPS,
                decoder_guidance_scale=3.0, num_inference_steps=zoo.STEPS, output_type="latent")


CASES: dict = {
    "WuerstchenPriorPipeline": zoo._case(lambda: wuerstchen("WuerstchenPriorPipeline"), prior_kwargs),
    "WuerstchenDecoderPipeline": zoo._case(lambda: wuerstchen("WuerstchenDecoderPipeline"),
                                           lambda: decoder_kwargs(False)),
    "StableCascadePriorPipeline": zoo._case(lambda: cascade("StableCascadePriorPipeline"), prior_kwargs),
    "StableCascadeDecoderPipeline": zoo._case(lambda: cascade("StableCascadeDecoderPipeline"),
                                              lambda: decoder_kwargs(True)),
}


def _ddpm():
    """A DDPM-type scheduler for Stable Cascade (it converts t to the ratio from alphas_cumprod and steps with t);
    the zoo's second-scheduler test then swaps in DPM-Solver++ from its config."""
    return diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)


# Stable Cascade under a scheduler other than DDPMWuerstchenScheduler: the same classes, extra cases.
EXTRA_CASES: dict = {
    f"{name}[DDPMScheduler]": zoo._case(lambda name=name: cascade(name, _ddpm()), CASES[name][1])
    for name in ("StableCascadePriorPipeline", "StableCascadeDecoderPipeline")
}
