"""Tiny pipelines of the unet_video family for tests/test_pipeline_zoo.py (rows in pipelines/adapters.py's unet_video block).

Builders use pipeline_zoo's helpers (imported as `zoo`, used inside functions only: pipeline_zoo imports
this module at its end) and cache shared components with functools.cache.

AnimateDiff variants (SDXL, PAG, PIA) reuse the SD / SDXL components with a motion adapter; the
ModelScope-style UNet3D pipelines (TextToVideoSD, VideoToVideoSD) and I2VGen-XL reuse the SD VAE, text
encoder and tokenizer (hidden size 32) around their own tiny 3-D UNets.
"""

from __future__ import annotations

import functools

import torch

import diffusers
import pipeline_zoo as zoo  # noqa: F401  (helpers: zoo._make, zoo._new, zoo._text, zoo._latent_call, ...)
import tiny_pipelines as tp

_FRAMES = 4  # 16 x 16 pixels: 8 x 8 latents (the SD VAE's factor 2)


def _sd_text_parts() -> dict:
    sd = zoo._sd_parts()
    return {k: sd[k] for k in ("vae", "text_encoder", "tokenizer", "scheduler")}


def _video_call(**kw) -> dict:
    return dict(prompt=tp.PROMPTS, height=16, width=16, num_inference_steps=zoo.STEPS, output_type="latent", **kw)


def _video() -> list:
    """Two 4-frame videos (lists of (3, 16, 16) frames), one per prompt."""
    frames = list(zoo._image(16, seed=152))
    return [frames * 2, frames[::-1] * 2]


# --- AnimateDiff SDXL: the SDXL components plus a motion adapter of the same widths ---------------------
def _animatediff_sdxl():
    return zoo._make("AnimateDiffSDXLPipeline", **zoo._sdxl_parts(), motion_adapter=zoo._motion_adapter())


def _animatediff_sdxl_kwargs() -> dict:
    return _video_call(guidance_scale=5.0, num_frames=_FRAMES)


# --- PIA: a motion adapter with a 9-channel conv_in (latents, mask, masked-image latents) -----------------
@functools.cache
def _pia_motion_adapter() -> torch.nn.Module:
    return zoo._init(diffusers.MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1,
                                             motion_norm_num_groups=4, motion_num_attention_heads=2,
                                             conv_in_channels=9), 201)


def _pia():
    return zoo._make("PIAPipeline", **_sd_text_parts(), unet=zoo._sd_parts()["unet"],
                     motion_adapter=_pia_motion_adapter())


def _pia_kwargs() -> dict:
    return _video_call(image=zoo._image(seed=202), guidance_scale=7.5, num_frames=_FRAMES)


# --- ModelScope text-to-video / video-to-video (UNet3DConditionModel, latents (B, C, F, H, W)) ---------------
@functools.cache
def _unet3d() -> torch.nn.Module:
    return zoo._init(diffusers.UNet3DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4), 211)


def _text_to_video(cls_name: str):
    return zoo._make(cls_name, **_sd_text_parts(), unet=_unet3d())


def _text_to_video_kwargs(video: bool = False) -> dict:
    if video:
        # One prompt and one 4-frame video: VideoToVideoSDPipeline noises (B*F, C, h, w) latents with B timesteps,
        # so diffusers 0.42 fails on any batch of several multi-frame videos. Strength 0.75 of 4 steps: 3 run.
        return dict(prompt=tp.PROMPTS[:1], video=_video()[:1], strength=0.75, guidance_scale=9.0,
                    num_inference_steps=4, output_type="latent")
    return _video_call(guidance_scale=9.0, num_frames=_FRAMES)


# --- I2VGen-XL: its own UNet, a tiny CLIP vision encoder (image embeddings) and the SD VAE (image latents) ------
@functools.cache
def _i2vgen_parts() -> dict:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = zoo._init(diffusers.I2VGenXLUNet(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4), 221)
    image_encoder = zoo._new(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        intermediate_size=16, patch_size=4)), 222)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        timestep_spacing="leading")
    return dict(_sd_text_parts(), unet=unet, image_encoder=image_encoder, scheduler=scheduler,
                feature_extractor=CLIPImageProcessor(crop_size=32, size=32))


def _i2vgen_kwargs() -> dict:
    # clip_skip=None: its default 1 reads text_encoder.text_model, which this transformers' CLIPTextModel lacks
    return _video_call(image=zoo._image(seed=223), guidance_scale=9.0, num_frames=_FRAMES, target_fps=8,
                       clip_skip=None)


# --- AnimateDiff ControlNet: the SD ControlNet on one conditioning frame per video frame -----------------
def _animatediff_controlnet():
    parts = dict(zoo._sd_parts(), motion_adapter=zoo._motion_adapter(), controlnet=zoo._controlnet("sd"))
    return zoo._make("AnimateDiffControlNetPipeline", **{k: v for k, v in parts.items() if k != "safety_checker"})


def _animatediff_controlnet_kwargs() -> dict:
    # One prompt: the pipeline does not repeat its conditioning frames over several prompts (a diffusers bug).
    return dict(prompt=tp.PROMPTS[:1], guidance_scale=7.5, height=32, width=32, num_frames=4,
                conditioning_frames=list(zoo._image(32, seed=160)) * 2, num_inference_steps=zoo.STEPS,
                output_type="latent")


def _animatediff_v2v_controlnet():
    parts = dict(zoo._sd_parts(), motion_adapter=zoo._motion_adapter(), controlnet=zoo._controlnet("sd"))
    return zoo._make("AnimateDiffVideoToVideoControlNetPipeline",
                     **{k: v for k, v in parts.items() if k != "safety_checker"})


def _animatediff_v2v_controlnet_kwargs() -> dict:
    frames = list(zoo._image(32, seed=152))
    return dict(prompt=tp.PROMPTS[:1], guidance_scale=7.5, height=32, width=32, video=frames * 2,
                conditioning_frames=list(zoo._image(32, seed=160)) * 2, strength=0.75, num_inference_steps=4,
                output_type="latent")


# --- AnimateDiff SparseCtrl: a tiny SparseControlNetModel conditioned on frames 0 and 3 ------------------
@functools.cache
def _sparse_controlnet() -> torch.nn.Module:
    return zoo._init(diffusers.SparseControlNetModel(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=32,
        attention_head_dim=4, conditioning_embedding_out_channels=(8, 16), motion_num_attention_heads=2,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"), conditioning_channels=3,
        use_simplified_condition_embedding=False), 170)


def _animatediff_sparse():
    parts = dict(zoo._sd_parts(), motion_adapter=zoo._motion_adapter(), controlnet=_sparse_controlnet())
    return zoo._make("AnimateDiffSparseControlNetPipeline", **{k: v for k, v in parts.items() if k != "safety_checker"})


def _animatediff_sparse_kwargs() -> dict:
    return dict(prompt=tp.PROMPTS[:1], guidance_scale=7.5, height=32, width=32, num_frames=4,
                conditioning_frames=[f[None] for f in zoo._image(32, seed=160)], controlnet_frame_indices=[0, 3],
                num_inference_steps=zoo.STEPS, output_type="latent")



# --- Stable Video Diffusion: a tiny spatio-temporal UNet (GroupNorm(32): widths of 32), CLIP vision, temporal VAE --
@functools.cache
def _svd_parts() -> dict:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    unet = zoo._init(diffusers.UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=32,
        num_attention_heads=8, projection_class_embeddings_input_dim=96, addition_time_embed_dim=32), 401)
    encoder = zoo._new(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        intermediate_size=37, patch_size=4)), 402)
    vae = zoo._new(lambda: diffusers.AutoencoderKLTemporalDecoder(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        latent_channels=4), 403)
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, interpolation_type="linear",
        prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1, timestep_spacing="leading",
        timestep_type="continuous", use_karras_sigmas=True)
    return dict(unet=unet, image_encoder=encoder, vae=vae, scheduler=scheduler,
                feature_extractor=CLIPImageProcessor(crop_size=32, size=32))


def _svd_kwargs() -> dict:
    return dict(image=zoo._image(32), height=32, width=32, num_frames=3, num_inference_steps=zoo.STEPS,
                min_guidance_scale=3.0, max_guidance_scale=3.0, output_type="latent", decode_chunk_size=1)

CASES: dict = {
    "StableVideoDiffusionPipeline": zoo._case(lambda: zoo._make("StableVideoDiffusionPipeline", **_svd_parts()),
                                              _svd_kwargs),
    "AnimateDiffVideoToVideoControlNetPipeline": zoo._case(_animatediff_v2v_controlnet,
                                                           _animatediff_v2v_controlnet_kwargs),
    "AnimateDiffSparseControlNetPipeline": zoo._case(_animatediff_sparse, _animatediff_sparse_kwargs),
    "AnimateDiffControlNetPipeline": zoo._case(_animatediff_controlnet, _animatediff_controlnet_kwargs),
    "AnimateDiffSDXLPipeline": zoo._case(_animatediff_sdxl, _animatediff_sdxl_kwargs),
    "AnimateDiffPAGPipeline": zoo._case(
        lambda: zoo._animatediff("AnimateDiffPAGPipeline"),
        lambda: zoo._pag_kwargs("AnimateDiffPAGPipeline", "AnimateDiffPipeline")),
    "PIAPipeline": zoo._case(_pia, _pia_kwargs),
    "TextToVideoSDPipeline": zoo._case(lambda: _text_to_video("TextToVideoSDPipeline"), _text_to_video_kwargs),
    "VideoToVideoSDPipeline": zoo._case(lambda: _text_to_video("VideoToVideoSDPipeline"),
                                        lambda: _text_to_video_kwargs(video=True)),
    "I2VGenXLPipeline": zoo._case(lambda: zoo._make("I2VGenXLPipeline", **_i2vgen_parts()), _i2vgen_kwargs),
}
