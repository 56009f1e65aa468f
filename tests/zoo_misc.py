"""Tiny pipelines of the misc family for tests/test_pipeline_zoo.py (rows in pipelines/adapters.py's misc block).

Builders use pipeline_zoo's helpers (imported as `zoo`, used inside functions only: pipeline_zoo imports
this module at its end) and cache shared components with functools.cache.
"""

from __future__ import annotations

import functools

import torch

import diffusers
import pipeline_zoo as zoo  # noqa: F401  (helpers: zoo._make, zoo._new, zoo._text, zoo._latent_call, ...)


def _without(parts: dict, *names: str) -> dict:
    return {k: v for k, v in parts.items() if k not in names}


# --- research pipelines running the plain SD loop, on the SD tiny components --------------------------------
def _sd_research(cls_name: str, **extra):
    return zoo._make(cls_name, **_without(zoo._sd_parts(), "safety_checker", "feature_extractor", "image_encoder"),
                     requires_safety_checker=False, **extra)


def _diffedit():
    scheduler = zoo._sd_parts()["scheduler"]
    return _sd_research("StableDiffusionDiffEditPipeline",
                        inverse_scheduler=diffusers.DDIMInverseScheduler.from_config(scheduler.config))


def _diffedit_kwargs() -> dict:
    # mask and inverted latents (one per step: batch x steps x C x h x w) at the 16x16 latent size
    kw = {k: v for k, v in zoo._sd_kwargs("sd").items() if k not in ("height", "width")}
    kw.update(mask_image=zoo._mask(16), inpaint_strength=1.0,
              image_latents=zoo._embeds(zoo.BATCH, zoo.STEPS, 4, 16, 16, seed=301))
    return kw


# --- Versatile Diffusion: the SD tiny UNet as image_unet, CLIP text / vision encoders with projections ----
@functools.cache
def _clip_vision() -> tuple:
    """A tiny CLIPVisionModelWithProjection (32 px, patch 8: 17 tokens)."""
    import transformers

    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
    encoder = zoo._new(lambda: transformers.CLIPVisionModelWithProjection(config), 311)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return encoder, processor


def _vd_unets(seed: int) -> tuple:
    """A fresh image_unet (the pipelines swap / fuse its attention blocks in place) and a flat text_unet."""
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

    config = {k: v for k, v in zoo._sd_parts()["unet"].config.items() if k != "_use_default_values"}
    image_unet = zoo._init(diffusers.UNet2DConditionModel.from_config(config), seed)
    flat = {**config, "down_block_types": ("DownBlockFlat", "CrossAttnDownBlockFlat"),
            "mid_block_type": "UNetMidBlockFlatCrossAttn", "up_block_types": ("CrossAttnUpBlockFlat", "UpBlockFlat")}
    text_unet = zoo._init(UNetFlatConditionModel.from_config(flat), seed + 1)
    return image_unet, text_unet


def _vd(cls_name: str, seed: int, text_unet: bool = True):
    sdxl = zoo._sdxl_parts()  # its second text encoder is a CLIPTextModelWithProjection (32-d, as the UNet)
    encoder, processor = _clip_vision()
    image_unet, text_unet = _vd_unets(seed) if text_unet else (_vd_unets(seed)[0], None)
    return zoo._make(cls_name, tokenizer=sdxl["tokenizer_2"], text_encoder=sdxl["text_encoder_2"],
                     image_feature_extractor=processor, image_encoder=encoder, image_unet=image_unet,
                     text_unet=text_unet, vae=zoo._sd_parts()["vae"], scheduler=zoo._sd_parts()["scheduler"])


def _vd_kwargs(text: bool = True, image: bool = False) -> dict:
    kw = {k: v for k, v in zoo._sd_kwargs("sd").items() if k != "num_images_per_prompt"}
    if image:
        images = list(zoo._image(seed=312))
        if text:
            kw.update(image=images, text_to_image_strength=0.6)
        else:
            del kw["prompt"]
            kw["image"] = images
    return kw


# --- BLIP-Diffusion: the SD tiny UNet, a ContextCLIPTextModel and a stand-in Q-Former ---------------------
class _QueryTokens(torch.nn.Module):
    """Stands in for BLIP-Diffusion's Blip2QFormerModel, whose forward needs transformers 4's
    `invert_attention_mask` (gone in transformers 5): subject query embeddings from the reference pixels."""

    def __init__(self, num_query_tokens: int = 4, dim: int = 32):
        super().__init__()
        import types

        self.config = types.SimpleNamespace(num_query_tokens=num_query_tokens)
        self.proj = torch.nn.Linear(3 * 4 * 4, num_query_tokens * dim)
        self.dim = dim

    @property
    def device(self) -> torch.device:  # read by DiffusionPipeline.device / _execution_device
        return self.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.proj.weight.dtype

    def forward(self, image_input, text_input, return_dict=False):
        pooled = torch.nn.functional.adaptive_avg_pool2d(image_input, 4).flatten(1)
        return self.proj(pooled).view(image_input.shape[0], self.config.num_query_tokens, self.dim)


@functools.cache
def _blip_parts() -> dict:
    from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import BlipImageProcessor
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel

    sd = zoo._sd_parts()
    return dict(
        tokenizer=sd["tokenizer"], unet=sd["unet"], vae=sd["vae"],
        text_encoder=zoo._init(zoo._new(lambda: ContextCLIPTextModel(sd["text_encoder"].config), 331), 331),
        qformer=zoo._init(zoo._new(_QueryTokens, 332), 332),
        scheduler=diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                          set_alpha_to_one=False, skip_prk_steps=True),
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}))


def _pil_images(seed: int) -> list:
    import PIL.Image

    return [PIL.Image.fromarray((image.permute(1, 2, 0) * 255).to(torch.uint8).numpy())
            for image in zoo._image(seed=seed)]


def _blip_kwargs(control: bool = False) -> dict:
    kw = dict(prompt=["swimming underwater", "on a red carpet"], reference_image=_pil_images(333),
              source_subject_category=["dog", "cat"], target_subject_category=["dog", "cat"], guidance_scale=7.5,
              height=32, width=32, num_inference_steps=zoo.STEPS, prompt_reps=2, output_type="pt")
    if control:
        kw["condtioning_image"] = _pil_images(334)  # sic: the pipeline's keyword
    return kw


# --- Kandinsky 5 text-to-image: channels-last (B, 1, H, W, C) latents, two sequential calls (cond, uncond) --
@functools.cache
def _kandinsky5_transformer() -> torch.nn.Module:
    return zoo._new(lambda: diffusers.Kandinsky5Transformer3DModel(
        in_visual_dim=16, in_text_dim=32, in_text_dim2=16, time_dim=16, out_visual_dim=16, patch_size=(1, 2, 2),
        model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(1, 1, 2), visual_cond=False,
        attention_type="regular"), 341)


def _kandinsky5():
    pipe = zoo._make("Kandinsky5T2IPipeline", transformer=_kandinsky5_transformer(),
                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.resolutions = [(64, 64)]  # as diffusers' own tiny test: the pipeline snaps (width, height) to this list
    return pipe


def _kandinsky5_kwargs() -> dict:
    length = 8
    seqlens = torch.arange(zoo.BATCH + 1, dtype=torch.int32) * length
    kw = zoo._latent_call(height=64, width=64, guidance_scale=4.0, prompt_cu_seqlens=seqlens,
                          negative_prompt_cu_seqlens=seqlens.clone(), **zoo._text(32, 342, length))
    kw["prompt_embeds_qwen"] = kw.pop("prompt_embeds")
    kw["negative_prompt_embeds_qwen"] = kw.pop("negative_prompt_embeds")
    kw.update(prompt_embeds_clip=zoo._embeds(zoo.BATCH, 16, seed=344),
              negative_prompt_embeds_clip=zoo._embeds(zoo.BATCH, 16, seed=345))
    return kw


# --- SANA-WM: one image + one prompt (batch 1), camera-conditioned video DiT, first latent frame kept clean ----
@functools.cache
def _sana_wm_parts() -> dict:
    vae = zoo._new(lambda: diffusers.AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), decoder_block_out_channels=(8,),
        layers_per_block=(1,), decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False), downsample_type=("spatial",),
        upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False, spatial_compression_ratio=2, temporal_compression_ratio=4), 351)
    transformer = zoo._init(zoo._new(lambda: diffusers.SanaWMTransformer3DModel(
        in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2, linear_head_dim=16, softmax_every_n=2,
        chunk_plucker_channels=24, chunk_plucker_post_attn_blocks=2, caption_channels=16, image_size=16,
        mixed_precision="fp32"), 352), 352)  # chunk_plucker_channels = 6 x the VAE's temporal ratio
    return dict(vae=vae, transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def _sana_wm_kwargs() -> dict:
    ones = torch.ones(1, 8, dtype=torch.long)
    return dict(image=_pil_images(353)[0], prompt="a road", action="w-8", intrinsics=[16.0, 16.0, 8.0, 8.0],
                height=16, width=16, num_frames=9, num_inference_steps=zoo.STEPS, guidance_scale=5.0,
                prompt_embeds=zoo._embeds(1, 1, 8, 16, seed=354), prompt_attention_mask=ones,
                negative_prompt_embeds=zoo._embeds(1, 1, 8, 16, seed=355), negative_prompt_attention_mask=ones.clone(),
                output_type="latent")


# --- JoyImage-Edit: 6-D latents (B, items, C, T, H, W), the clean reference image first; cond then uncond call --
def _joyimage():
    from diffusers.pipelines.joyimage.image_processor import JoyImageEditImageProcessor

    class _AsAsked(JoyImageEditImageProcessor):
        """The pipeline snaps (height, width) to its 1024-px buckets (>= 512 px a side); diffusers' own tiny test
        patches that lookup out too: keep the asked size."""

        def get_default_height_width(self, image, height=None, width=None):
            return height, width

    pipe = zoo._make("JoyImageEditPipeline", transformer=_joyimage_transformer(), vae=zoo._wan_vae(),
                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    pipe.vae_image_processor = _AsAsked(vae_scale_factor=pipe.vae_scale_factor_spatial)
    return pipe


@functools.cache
def _joyimage_transformer() -> torch.nn.Module:
    return zoo._new(lambda: diffusers.JoyImageEditTransformer3DModel(
        patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=1,
        rope_dim_list=[4, 6, 6], theta=256), 361)


def _joyimage_kwargs() -> dict:
    return zoo._latent_call(height=32, width=32, guidance_scale=4.0, image=_pil_images(362),
                            **zoo._text(16, 363, mask="prompt_embeds_mask"))


CASES: dict = {
    "StableDiffusionModelEditingPipeline": zoo._case(lambda: _sd_research("StableDiffusionModelEditingPipeline"),
                                                     lambda: zoo._sd_kwargs("sd")),
    "StableDiffusionDiffEditPipeline": zoo._case(_diffedit, _diffedit_kwargs),
    "VersatileDiffusionTextToImagePipeline": zoo._case(lambda: _vd("VersatileDiffusionTextToImagePipeline", 321),
                                                       _vd_kwargs),
    "VersatileDiffusionImageVariationPipeline": zoo._case(
        lambda: _vd("VersatileDiffusionImageVariationPipeline", 323), lambda: _vd_kwargs(text=False, image=True)),
    # without a text_unet: diffusers 0.42.1's DualTransformer2DModel rejects the UNet's encoder_attention_mask
    "BlipDiffusionPipeline": zoo._case(lambda: zoo._make("BlipDiffusionPipeline", **_blip_parts()), _blip_kwargs),
    "BlipDiffusionControlNetPipeline": zoo._case(
        lambda: zoo._make("BlipDiffusionControlNetPipeline", **_blip_parts(), controlnet=zoo._controlnet("sd")),
        lambda: _blip_kwargs(control=True)),
    "Kandinsky5T2IPipeline": zoo._case(_kandinsky5, _kandinsky5_kwargs),
    "SanaWMPipeline": zoo._case(lambda: zoo._make("SanaWMPipeline", **_sana_wm_parts()), _sana_wm_kwargs),
    "JoyImageEditPipeline": zoo._case(_joyimage, _joyimage_kwargs),
}
