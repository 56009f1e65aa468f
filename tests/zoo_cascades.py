"""Tiny pipelines of the cascades family for tests/test_pipeline_zoo.py (rows in pipelines/adapters.py's cascades block).

Builders use pipeline_zoo's helpers (imported as `zoo`, used inside functions only: pipeline_zoo imports
this module at its end) and cache shared components with functools.cache.
"""

from __future__ import annotations

import functools

import torch

import diffusers
import pipeline_zoo as zoo  # noqa: F401  (helpers: zoo._make, zoo._new, zoo._text, zoo._latent_call, ...)
import tiny_pipelines as tp


# --- Kandinsky 3: guides as (s + 1) c - s u, on when s > 1 ----------------------------------------------
@functools.cache
def _kandinsky3_unet() -> torch.nn.Module:
    return zoo._init(diffusers.Kandinsky3UNet(
        in_channels=4, time_embedding_dim=4, groups=2, attention_head_dim=4, layers_per_block=2,
        block_out_channels=(32, 64), cross_attention_dim=4, encoder_hid_dim=32), 202)


def _kandinsky3(cls_name: str):
    scheduler = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                        beta_schedule="squaredcos_cap_v2", clip_sample=True, thresholding=False)
    return zoo._make(cls_name, unet=_kandinsky3_unet(), movq=zoo._movq(), scheduler=scheduler)


def _kandinsky3_kwargs(image: bool = False) -> dict:
    kw = zoo._latent_call(height=16, width=16, guidance_scale=3.0, **zoo._text(32, 203, mask="attention_mask"))
    if image:
        kw.update(image=zoo._image(16), strength=0.75, num_inference_steps=4)
    return kw


# --- DeepFloyd IF: pixel-space UNets with learned variance (6 output channels); the super-resolution stages
# take [noisy image; upscaled image] (6 input channels) and the noise level as class labels ---------------
def _if_unet(super_resolution: bool) -> torch.nn.Module:
    extra = dict(class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu",
                 time_embedding_dim=32) if super_resolution else {}
    return zoo._new(lambda: diffusers.UNet2DConditionModel(
        sample_size=16, layers_per_block=1, block_out_channels=[32, 64],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        in_channels=6 if super_resolution else 3, out_channels=6, cross_attention_dim=32, encoder_hid_dim=32,
        attention_head_dim=8, addition_embed_type="text", addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu", **extra),
        211 + super_resolution)


@functools.cache
def _if_unets() -> tuple:
    return _if_unet(False), _if_unet(True)


def _if_scheduler(learned: bool = True):
    extra = dict(thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0, prediction_type="epsilon",
                 variance_type="learned_range") if learned else {}
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001,
                                   beta_end=0.02, **extra)


def _if(cls_name: str):
    super_resolution = "SuperResolution" in cls_name
    parts = dict(unet=_if_unets()[super_resolution], scheduler=_if_scheduler(), requires_safety_checker=False)
    if super_resolution:
        parts["image_noising_scheduler"] = _if_scheduler(learned=False)
    return zoo._make(cls_name, **parts)


def _if_kwargs(cls_name: str) -> dict:
    kw = dict(num_inference_steps=zoo.STEPS, output_type="pt", guidance_scale=4.0, **zoo._text(32, 213))
    super_resolution = "SuperResolution" in cls_name
    if super_resolution:
        kw["image"] = zoo._image(8, seed=214)
        if "Img2Img" in cls_name or "Inpainting" in cls_name:
            kw.update(original_image=zoo._image(16, seed=215), strength=0.75, num_inference_steps=4)
    elif "Img2Img" in cls_name:
        kw.update(image=zoo._image(16, seed=215), strength=0.75, num_inference_steps=4)
    elif "Inpainting" in cls_name:
        kw.update(image=zoo._image(16, seed=215))
    else:
        kw.update(height=16, width=16)
    if "Inpainting" in cls_name:
        kw["mask_image"] = zoo._mask(16)
    return kw


# --- AudioLDM / MusicLDM: a UNet on mel latents conditioned by class labels (the CLAP text embedding) ---------
@functools.cache
def _audioldm_parts() -> dict:
    import transformers

    unet = zoo._new(lambda: diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=(32, 64), class_embed_type="simple_projection", projection_class_embeddings_input_dim=32,
        class_embeddings_concat=True), 221)
    vae = zoo._new(lambda: diffusers.AutoencoderKL(
        block_out_channels=[32, 64], in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4), 222)
    # Only its dtype is read (the call passes CLAP embeddings).
    text_encoder = zoo._new(lambda: transformers.ClapTextModelWithProjection(transformers.ClapTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1, vocab_size=100,
        projection_dim=32)), 223)
    vocoder = zoo._new(lambda: transformers.SpeechT5HifiGan(transformers.SpeechT5HifiGanConfig(
        model_in_dim=8, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[2, 2],
        upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
        normalize_before=False)), 224)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, vocoder=vocoder)


def _audioldm(cls_name: str, parts: dict):
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False)
    return zoo._make(cls_name, **parts, scheduler=scheduler)


def _audioldm_kwargs() -> dict:
    return dict(prompt_embeds=zoo._embeds(zoo.BATCH, 32, seed=225), negative_prompt_embeds=zoo._embeds(
        zoo.BATCH, 32, seed=226), num_inference_steps=zoo.STEPS, guidance_scale=3.0, output_type="pt")


@functools.cache
def _audioldm2_parts() -> dict:
    import transformers

    unet = zoo._new(lambda: diffusers.AudioLDM2UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=([32, 32], [32, 32])), 231)
    # Only their dtypes are read (the call passes the T5 and the generated GPT-2 embeddings).
    text_encoder_2 = zoo._new(lambda: transformers.T5EncoderModel(transformers.T5Config(
        d_model=32, num_layers=1, num_heads=2, d_kv=8, d_ff=37, vocab_size=100)), 232)
    language_model = zoo._new(lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=2)), 233)
    audioldm = _audioldm_parts()
    return dict(unet=unet, vae=audioldm["vae"], vocoder=audioldm["vocoder"], text_encoder_2=text_encoder_2,
                language_model=language_model)


def _audioldm2_kwargs() -> dict:
    kw = dict(num_inference_steps=zoo.STEPS, guidance_scale=3.0, output_type="pt", **zoo._text(32, 234))
    generated = zoo._text(32, 236, prefix="generated_")
    return {**kw, **generated}


# --- Stable Audio 3: a flow DiT on 1-D audio latents; the duration is one more cross-attention token ----------
@functools.cache
def _stable_audio3_parts() -> dict:
    from diffusers.pipelines.stable_audio_3.modeling_stable_audio_3 import StableAudio3DurationEmbedder

    transformer = zoo._new(lambda: diffusers.StableAudio3DiTModel(
        io_channels=8, patch_size=1, embed_dim=32, depth=2, num_heads=4, cond_token_dim=16, global_cond_dim=16,
        local_add_cond_dim=5, timestep_features_dim=16, ff_mult=2, num_memory_tokens=3,
        use_differential_attention=False), 241)
    vae = zoo._new(lambda: diffusers.AutoencoderSAME(
        audio_channels=2, patch_size=2, encoder_channels=8, encoder_c_mults=(2,), encoder_strides=(2,),
        encoder_transformer_depths=(1,), latent_dim=8, use_differential_attention=False, dim_heads=4,
        ff_mult=2, sampling_rate=16), 242)
    duration_embedder = zoo._new(lambda: StableAudio3DurationEmbedder(output_dim=16, fourier_dim=16), 243)
    return dict(transformer=zoo._init(transformer, 244), vae=vae, duration_embedder=duration_embedder,
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def _stable_audio3_kwargs() -> dict:
    return dict(duration=1.0, num_inference_steps=zoo.STEPS, guidance_scale=3.0, output_type="latent",
                **zoo._text(16, 245, mask="encoder_attention_mask"))


_IF = ("IFPipeline IFImg2ImgPipeline IFInpaintingPipeline IFSuperResolutionPipeline IFImg2ImgSuperResolutionPipeline "
       "IFInpaintingSuperResolutionPipeline").split()



# --- Shap-E: a tiny PriorTransformer (learned variance on the last axis), CLIP text encoder, Heun -------------
@functools.cache
def _shap_e_parts() -> dict:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    prior = zoo._init(diffusers.PriorTransformer(
        num_attention_heads=2, attention_head_dim=16, embedding_dim=16, num_embeddings=32, embedding_proj_dim=16,
        time_embed_dim=64, num_layers=1, clip_embed_dim=32, additional_embeddings=0, time_embed_act_fn="gelu",
        norm_in_type="layer", embedding_proj_norm_type="layer", encoder_hid_proj_type=None, added_emb_type=None), 601)
    tokenizer = tp.clip_tokenizer()
    encoder = zoo._new(lambda: CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=16, projection_dim=16, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, pad_token_id=1, vocab_size=len(tokenizer))), 602)
    renderer = diffusers.pipelines.shap_e.ShapERenderer(param_shapes=((16, 8),) * 4, d_latent=16, d_hidden=8,
                                                       n_output=12, background=(0.1, 0.1, 0.1))
    scheduler = diffusers.HeunDiscreteScheduler(beta_schedule="exp", num_train_timesteps=1024, prediction_type="sample",
                                                use_karras_sigmas=True, clip_sample=True, clip_sample_range=1.0)
    return dict(prior=prior, text_encoder=encoder, tokenizer=tokenizer, shap_e_renderer=renderer, scheduler=scheduler)


def _shap_e_kwargs() -> dict:
    return dict(prompt="a horse", num_images_per_prompt=2, guidance_scale=4.0, num_inference_steps=zoo.STEPS,
                frame_size=8, output_type="latent")

CASES: dict = {
    "ShapEPipeline": zoo._case(lambda: zoo._make("ShapEPipeline", **_shap_e_parts()), _shap_e_kwargs),
    "StableAudio3Pipeline": zoo._case(lambda: zoo._make("StableAudio3Pipeline", **_stable_audio3_parts()),
                                      _stable_audio3_kwargs),
    "AudioLDM2Pipeline": zoo._case(lambda: _audioldm("AudioLDM2Pipeline", _audioldm2_parts()), _audioldm2_kwargs),
    "AudioLDMPipeline": zoo._case(lambda: _audioldm("AudioLDMPipeline", _audioldm_parts()), _audioldm_kwargs),
    "MusicLDMPipeline": zoo._case(lambda: _audioldm("MusicLDMPipeline", _audioldm_parts()), _audioldm_kwargs),
    **{name: zoo._case(lambda name=name: _if(name), lambda name=name: _if_kwargs(name)) for name in _IF},
    "Kandinsky3Pipeline": zoo._case(lambda: _kandinsky3("Kandinsky3Pipeline"), _kandinsky3_kwargs),
    "Kandinsky3Img2ImgPipeline": zoo._case(lambda: _kandinsky3("Kandinsky3Img2ImgPipeline"),
                                           lambda: _kandinsky3_kwargs(image=True)),
}
