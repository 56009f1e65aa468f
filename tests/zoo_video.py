"""Tiny pipelines of the video family for tests/test_pipeline_zoo.py (rows in pipelines/adapters.py's video block).

Builders use pipeline_zoo's helpers (imported as `zoo`, used inside functions only: pipeline_zoo imports
this module at its end) and cache shared components with functools.cache.
"""

from __future__ import annotations

import functools

import PIL.Image
import torch

import diffusers
import pipeline_zoo as zoo  # noqa: F401  (helpers: zoo._make, zoo._new, zoo._text, zoo._latent_call, ...)

_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, out_channels=16, text_dim=32,
            freq_dim=256, ffn_dim=32, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _video(frames: int = 5, size: int = 16, seed: int = 201) -> list:
    """One video as a list of PIL frames."""
    pixels = torch.randint(0, 256, (frames, size, size, 3), generator=torch.Generator().manual_seed(seed))
    return [PIL.Image.fromarray(frame.numpy().astype("uint8")) for frame in pixels]


# --- Wan 2.1 variants (WanTransformer3DModel, sequential cond / uncond calls) -------------------------------
@functools.cache
def _wan_i2v_transformer() -> torch.nn.Module:
    # 36 input channels: 16 noisy latents + 4 first-frame mask + 16 first-frame latents; CLIP image tokens (dim 4)
    return zoo._init(diffusers.WanTransformer3DModel(**_WAN, in_channels=36, num_layers=1, image_dim=4), 202)


@functools.cache
def _clip_vision() -> tuple:
    """A tiny CLIP vision tower (hidden size 4, 4x4 images: 17 tokens) and its processor."""
    import transformers

    config = transformers.CLIPVisionConfig(hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2,
                                           image_size=4, intermediate_size=16, patch_size=1)
    encoder = zoo._init(transformers.CLIPVisionModelWithProjection(config), 210)
    return encoder, transformers.CLIPImageProcessor(crop_size=4, size=4)


def _wan_i2v():
    encoder, processor = _clip_vision()
    return zoo._make("WanImageToVideoPipeline", transformer=_wan_i2v_transformer(), vae=zoo._wan_vae(),
                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0), image_encoder=encoder,
                     image_processor=processor)


def _wan_i2v_kwargs() -> dict:
    # The pipeline takes one image for the batch (it repeats its latents and CLIP tokens over the prompts) and refuses
    # image_embeds next to the image it needs for the first-frame latents: a tiny CLIP encodes it.
    return zoo._latent_call(image=zoo._image(16, seed=203)[:1], height=16, width=16, num_frames=5, guidance_scale=5.0,
                            **zoo._text(32, 205))


def _wan_v2v():
    return zoo._make("WanVideoToVideoPipeline", transformer=zoo._wan_transformer(51), vae=zoo._wan_vae(),
                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0))


def _wan_v2v_kwargs() -> dict:
    # one video for the batch (the pipeline encodes it once and repeats its latents); strength 0.75 of 4 steps: 3 run
    kw = zoo._latent_call(video=_video(), strength=0.75, height=16, width=16, guidance_scale=5.0, **zoo._text(32, 206))
    return {**kw, "num_inference_steps": 4}


@functools.cache
def _wan_vace_transformer() -> torch.nn.Module:
    # VACE context: 32 video latent channels (inactive, reactive) + 64 mask channels (8 x 8 pixels per latent)
    return zoo._init(diffusers.WanVACETransformer3DModel(**_WAN, in_channels=16, num_layers=2, vace_layers=[0, 1],
                                                         vace_in_channels=96), 207)


def _wan_vace():
    return zoo._make("WanVACEPipeline", transformer=_wan_vace_transformer(), vae=zoo._wan_vae(),
                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0))


def _wan_vace_kwargs() -> dict:
    # The pipeline takes one control video and its transformer pads the VACE context to the batch of that one
    # video: batch 1 (one prompt), as in diffusers' own tests.
    mask = [PIL.Image.new("L", (16, 16), 0)] * 2 + [PIL.Image.new("L", (16, 16), 255)] * 3
    text = {k: v[:1] for k, v in zoo._text(32, 209).items()}
    return zoo._latent_call(video=_video(seed=208), mask=mask, conditioning_scale=0.8, height=16, width=16,
                            num_frames=5, guidance_scale=5.0, **text)


# --- SkyReels-V2 (SkyReelsV2Transformer3DModel: Wan's layout) ----------------------------------------------------
# The diffusion-forcing pipelines (SkyReelsV2DiffusionForcing*) are not supported: they step per-frame copies of the
# scheduler and never the pipeline's own, so the hook reads sigmas[0] at every step (x0-space strategies go wrong).
@functools.cache
def _skyreels_transformer(in_channels: int = 16, image_dim: int | None = None) -> torch.nn.Module:
    return zoo._init(diffusers.SkyReelsV2Transformer3DModel(**_WAN, in_channels=in_channels, num_layers=1,
                                                            image_dim=image_dim), 211 + in_channels)


def _skyreels(cls_name: str, in_channels: int = 16, image_dim: int | None = None, clip: bool = False):
    # UniPC with flow sigmas, as SkyReels ships
    scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=8.0)
    parts = dict(transformer=_skyreels_transformer(in_channels, image_dim), vae=zoo._wan_vae(), scheduler=scheduler)
    if clip:
        parts["image_encoder"], parts["image_processor"] = _clip_vision()
    return zoo._make(cls_name, **parts)


def _skyreels_kwargs(image: bool = False) -> dict:
    kw = zoo._latent_call(height=16, width=16, num_frames=5, guidance_scale=5.0, **zoo._text(32, 220))
    if image:
        kw["image"] = zoo._image(16, seed=221)[:1]  # one image for the batch, as in Wan I2V
    return kw


# --- CogVideoX video-to-video (batched [uncond; cond], (B, F, C, H, W) latents) --------------------------------
# CogVideoXImageToVideoPipeline / CogVideoXFunControlPipeline concatenate their image / control latents on axis 2 of
# (B, F, C, H, W): not supported (the hook separates extra input channels on axis 1).
def _cogvideox_kwargs(**extra) -> dict:
    return {**zoo._latent_call(height=16, width=16, guidance_scale=6.0, **zoo._text(32, 232)), **extra}


# --- LTX-Video with conditions (LTXImageToVideoPipeline's components) -----------------------------------------
def _ltx_condition_kwargs() -> dict:
    # one conditioning image (frame 0) for the batch; its tokens get timestep 0 (per-token timesteps)
    kw = zoo._latent_call(height=32, width=32, num_frames=9, guidance_scale=3.0,
                          **zoo._text(32, 240, mask="prompt_attention_mask"))
    return {**kw, "image": zoo._image(32, seed=241)[:1]}


# --- batched [uncond; cond] text-to-video transformers (prompt embeddings, latent output, no VAE where it runs) --
# MochiPipeline is not supported: its shipped scheduler is FlowMatchEulerDiscreteScheduler(invert_sigmas=True), which
# the hook's x0 parametrization does not read (APG gets NaN at the first step).


@functools.cache
def _allegro_transformer() -> torch.nn.Module:
    return zoo._init(diffusers.AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, num_layers=1,
        cross_attention_dim=24, sample_width=8, sample_height=8, sample_frames=8, caption_channels=24), 252)


def _allegro_kwargs() -> dict:
    return zoo._latent_call(height=16, width=16, num_frames=8, guidance_scale=6.0, clean_caption=False,
                            negative_prompt=None, **zoo._text(24, 253, mask="prompt_attention_mask"))


@functools.cache
def _latte_transformer() -> torch.nn.Module:
    # learned sigma: 8 output channels for 4 latent channels (the pipeline keeps the first 4 after its CFG)
    return zoo._init(diffusers.LatteTransformer3DModel(
        sample_size=4, video_length=2, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6), 254)


def _latte_kwargs() -> dict:
    return zoo._latent_call(height=32, width=32, video_length=2, guidance_scale=5.0, clean_caption=False,
                            negative_prompt=None, mask_feature=False, **zoo._text(32, 255))


# --- EasyAnimate (batched; control / inpaint latents are keywords the transformer concatenates itself) ---------
@functools.cache
def _easyanimate_transformer(in_channels: int = 4) -> torch.nn.Module:
    # 4 latent channels (+ 8 inpaint channels: mask and masked-video latents, concatenated by the transformer).
    # resize_inpaint_mask_directly=True reads vae.config.cache_mag_vae, which AutoencoderKLMagvit lacks
    # (diffusers 0.42.1).
    return zoo._init(diffusers.EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=in_channels, out_channels=4, time_embed_dim=2,
        text_embed_dim=16, num_layers=1, sample_width=16, sample_height=16, patch_size=2,
        resize_inpaint_mask_directly=False), 260 + in_channels)


@functools.cache
def _magvit() -> torch.nn.Module:
    return zoo._init(diffusers.AutoencoderKLMagvit(
        in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
        norm_num_groups=2, spatial_group_norm=False,
        down_block_types=("SpatialDownBlock3D",) + ("SpatialTemporalDownBlock3D",) * 3,
        up_block_types=("SpatialUpBlock3D",) + ("SpatialTemporalUpBlock3D",) * 3), 269)


def _easyanimate(cls_name: str, in_channels: int = 4):
    return zoo._make(cls_name, transformer=_easyanimate_transformer(in_channels), vae=_magvit(),
                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def _clip(seed: int, frames: int = 5, channels: int = 3) -> torch.Tensor:
    """A batch of videos (B, C, F, H, W) in [0, 1], one per prompt."""
    return torch.rand(zoo.BATCH, channels, frames, 16, 16, generator=torch.Generator().manual_seed(seed))


# EasyAnimateControlPipeline is not supported: in diffusers 0.42.1 its __call__ passes text_encoder_index=0 to its
# own encode_prompt, which has no such parameter (a TypeError on every call).
def _easyanimate_kwargs(inpaint: bool = False) -> dict:
    kw = zoo._latent_call(height=16, width=16, num_frames=5, guidance_scale=6.0,
                          **zoo._text(16, 270, mask="prompt_attention_mask"))
    if inpaint:
        mask = torch.zeros(zoo.BATCH, 1, 5, 16, 16)
        mask[..., 4:12, 4:12] = 255.0
        kw.update(video=_clip(273) * 255.0, mask_video=mask, strength=1.0)
    return kw


# --- Sana-Video (batched; I2V keeps the first latent frame clean through per-frame timesteps) ----------------
@functools.cache
def _sana_video_transformer() -> torch.nn.Module:
    return zoo._init(diffusers.SanaVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=8,
        mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=8, patch_size=(1, 2, 2),
        norm_elementwise_affine=False, norm_eps=1e-6, qk_norm="rms_norm_across_heads", rope_max_seq_len=32), 280)


def _sana_video(cls_name: str):
    return zoo._make(cls_name, transformer=_sana_video_transformer(), vae=zoo._wan_vae(),
                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def _sana_video_kwargs(image: bool = False) -> dict:
    kw = zoo._latent_call(height=32, width=32, frames=5, guidance_scale=6.0, negative_prompt=None,
                          use_resolution_binning=False, complex_human_instruction=None,
                          **zoo._text(8, 281, mask="prompt_attention_mask"))
    if image:
        kw["image"] = zoo._image(32, seed=282)[:1]  # one image for the batch (the pipeline repeats its latents)
    return kw


# --- ChronoEdit (Wan I2V layout, calls without a cache context) and Lucy Edit (video latents on channels) -----
@functools.cache
def _chronoedit_transformer() -> torch.nn.Module:
    return zoo._init(diffusers.ChronoEditTransformer3DModel(**_WAN, in_channels=36, num_layers=1, image_dim=4), 290)


def _chronoedit():
    encoder, processor = _clip_vision()
    return zoo._make("ChronoEditPipeline", transformer=_chronoedit_transformer(), vae=zoo._wan_vae(),
                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0), image_encoder=encoder,
                     image_processor=processor)


@functools.cache
def _lucy_transformer() -> torch.nn.Module:
    # 32 input channels: 16 noisy latents + 16 latents of the video to edit
    return zoo._init(diffusers.WanTransformer3DModel(**_WAN, in_channels=32, num_layers=1), 291)


def _lucy():
    return zoo._make("LucyEditPipeline", transformer=_lucy_transformer(), vae=zoo._wan_vae(),
                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0))


# --- HunyuanVideo (true CFG: true_cfg_scale > 1 and a negative prompt; guidance_scale feeds the distilled embedding) --
@functools.cache
def _hunyuan_transformer(in_channels: int = 4, guidance: bool = True, condition: str | None = None) -> torch.nn.Module:
    return zoo._init(diffusers.HunyuanVideoTransformer3DModel(
        in_channels=in_channels, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=guidance,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), image_condition_type=condition),
        300 + in_channels + guidance)


@functools.cache
def _hunyuan_vae() -> torch.nn.Module:
    return zoo._init(diffusers.AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True), 309)


def _hunyuan(cls_name: str, **transformer):
    return zoo._make(cls_name, transformer=_hunyuan_transformer(**transformer), vae=_hunyuan_vae(),
                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0))


def _hunyuan_kwargs(image: bool = False) -> dict:
    kw = zoo._latent_call(height=16, width=16, num_frames=5, true_cfg_scale=4.0, guidance_scale=6.0,
                          **zoo._text(16, 310, mask="prompt_attention_mask"))
    kw.update(pooled_prompt_embeds=zoo._embeds(zoo.BATCH, 8, seed=312),
              negative_pooled_prompt_embeds=zoo._embeds(zoo.BATCH, 8, seed=313))
    if image:
        kw.update(image=zoo._image(16, seed=314), guidance_scale=1.0)  # one image per prompt; no guidance embedding
    return kw


# --- Wan-Animate (one segment: the pipeline re-sets its timesteps between segments) -----------------------------
@functools.cache
def _wan_animate_transformer() -> torch.nn.Module:
    # 36 input channels: 16 noisy latents + 20 reference latents (mask + latents); pose latents, face encoder on
    return zoo._init(diffusers.WanAnimateTransformer3DModel(
        **{**_WAN, "out_channels": 16}, in_channels=36, latent_channels=16, num_layers=2, image_dim=4,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16, motion_style_dim=8,
        motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
        inject_face_latents_blocks=2), 320)


def _wan_animate():
    encoder, processor = _clip_vision()
    return zoo._make("WanAnimatePipeline", transformer=_wan_animate_transformer(), vae=zoo._wan_vae(),
                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0), image_encoder=encoder,
                     image_processor=processor)


def _wan_animate_kwargs() -> dict:
    text = {k: v[:1] for k, v in zoo._text(32, 321).items()}  # one reference image: batch 1
    return zoo._latent_call(image=_video(1, seed=322)[0], pose_video=_video(5, seed=323),
                            face_video=_video(5, seed=324), height=16, width=16, segment_frame_length=5,
                            mode="animate", prev_segment_conditioning_frames=1, guidance_scale=5.0, **text)


# Not supported (no row): HunyuanVideoFramepackPipeline re-sets its timesteps for every section inside one call and
# passes each call its own latents.to(dtype) copy. The Cosmos world pipelines are in tests/zoo_cosmos.py.

# --- CogVideoX image-to-video / Fun control: the conditioning latents double the transformer's input channels ----
@functools.cache
def _cogvideox_conditioned_transformer() -> torch.nn.Module:
    return zoo._new(lambda: diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=8, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=1, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8), 84)


def _cogvideox_conditioned(cls_name: str):
    return zoo._make(cls_name, **{**zoo._cogvideox_parts(), "transformer": _cogvideox_conditioned_transformer()})


def _cogvideox_conditioned_kwargs(control: bool = False) -> dict:
    kw = zoo._latent_call(height=16, width=16, num_frames=9, guidance_scale=6.0, **zoo._text(32, 83))
    if control:  # one control video: the pipeline does not repeat it over several prompts (batch 1)
        kw.update({k: v[:1] for k, v in kw.items() if k.endswith("prompt_embeds")})
        kw["control_video"] = [([img for img in zoo._image(16, seed=85)] * 5)[:9]]  # one video of 9 frames
        del kw["num_frames"]
    else:
        kw["image"] = zoo._image(16)
    return kw


# --- Mochi: FlowMatch Euler with invert_sigmas, the transformer predicting x0 - eps -------------------------
@functools.cache
def _mochi_parts() -> dict:
    transformer = zoo._init(diffusers.MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=12, out_channels=None, qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=16), 501)
    vae = zoo._new(lambda: diffusers.AutoencoderKLMochi(
        latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1)), 502)
    return dict(transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True))


def _mochi_kwargs() -> dict:
    return zoo._latent_call(height=16, width=16, num_frames=7, guidance_scale=4.5,
                            **zoo._text(32, 503, mask="prompt_attention_mask"))

CASES: dict = {
    "MochiPipeline": zoo._case(lambda: zoo._make("MochiPipeline", **_mochi_parts()), _mochi_kwargs),
    "CogVideoXImageToVideoPipeline": zoo._case(lambda: _cogvideox_conditioned("CogVideoXImageToVideoPipeline"),
                                                 _cogvideox_conditioned_kwargs),
    "CogVideoXFunControlPipeline": zoo._case(lambda: _cogvideox_conditioned("CogVideoXFunControlPipeline"),
                                               lambda: _cogvideox_conditioned_kwargs(control=True)),
    "WanImageToVideoPipeline": (_wan_i2v, _wan_i2v_kwargs),
    "WanVideoToVideoPipeline": (_wan_v2v, _wan_v2v_kwargs),
    "WanVACEPipeline": (_wan_vace, _wan_vace_kwargs),
    "CogVideoXVideoToVideoPipeline": (
        lambda: zoo._make("CogVideoXVideoToVideoPipeline", **zoo._cogvideox_parts()),
        lambda: _cogvideox_kwargs(video=_video(9, seed=234), strength=0.75, num_inference_steps=4)),
    "LTXConditionPipeline": (lambda: zoo._make("LTXConditionPipeline", **zoo._ltx_parts()), _ltx_condition_kwargs),
    "AllegroPipeline": (lambda: zoo._make("AllegroPipeline", transformer=_allegro_transformer(),
                                          scheduler=diffusers.DDIMScheduler()), _allegro_kwargs),
    "LattePipeline": (lambda: zoo._make("LattePipeline", transformer=_latte_transformer(),
                                        scheduler=diffusers.DDIMScheduler()), _latte_kwargs),
    "EasyAnimatePipeline": (lambda: _easyanimate("EasyAnimatePipeline"), _easyanimate_kwargs),
    "EasyAnimateInpaintPipeline": (lambda: _easyanimate("EasyAnimateInpaintPipeline", 12),
                                   lambda: _easyanimate_kwargs(inpaint=True)),
    "SanaVideoPipeline": (lambda: _sana_video("SanaVideoPipeline"), _sana_video_kwargs),
    "SanaImageToVideoPipeline": (lambda: _sana_video("SanaImageToVideoPipeline"),
                                 lambda: _sana_video_kwargs(image=True)),
    "ChronoEditPipeline": (_chronoedit, lambda: zoo._latent_call(  # one image for the batch, as in Wan I2V
        image=zoo._image(16, seed=292)[:1], height=16, width=16, num_frames=5, guidance_scale=5.0,
        **zoo._text(32, 293))),
    "LucyEditPipeline": (_lucy, lambda: zoo._latent_call(  # one video per prompt
        video=[_video(seed=294), _video(seed=296)], height=16, width=16, num_frames=5, guidance_scale=5.0,
        **zoo._text(32, 295))),
    "HunyuanVideoPipeline": (lambda: _hunyuan("HunyuanVideoPipeline"), _hunyuan_kwargs),
    # I2V: [latents, image latents, mask] on channels (33 in the real model: 2 x 16 + 1)
    "HunyuanVideoImageToVideoPipeline": (
        lambda: _hunyuan("HunyuanVideoImageToVideoPipeline", in_channels=9, guidance=False, condition="latent_concat"),
        lambda: _hunyuan_kwargs(image=True)),
    # SkyReels-V1 I2V: [latents, image latents] on channels
    "HunyuanSkyreelsImageToVideoPipeline": (
        lambda: _hunyuan("HunyuanSkyreelsImageToVideoPipeline", in_channels=8),
        lambda: _hunyuan_kwargs(image=True)),
    "WanAnimatePipeline": (_wan_animate, _wan_animate_kwargs),
    "SkyReelsV2Pipeline": (lambda: _skyreels("SkyReelsV2Pipeline"), _skyreels_kwargs),
    "SkyReelsV2ImageToVideoPipeline": (lambda: _skyreels("SkyReelsV2ImageToVideoPipeline", 36, 4, clip=True),
                                       lambda: _skyreels_kwargs(image=True)),
}
