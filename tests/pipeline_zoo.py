"""Tiny pipelines of many diffusers classes, built from configs, for the hook's exactness tests.

Each case is one diffusers pipeline class: `build(name)` returns the pipeline (float32, CPU, eval,
progress bar off) and `call_kwargs(name)` a small guided call (batch 2, 3 steps). Variants of a
family share their components (one UNet for SD, SD img2img and SD ControlNet, ...), cached per
process, so the whole zoo builds in a few seconds. Families without a tiny tokenizer we can build
offline (or whose text encoders are large configs) get random prompt embeddings instead: the hook
never sees the text encoder, only the denoiser's batch.

`CASES` maps class name -> family; the adapter table (`pipelines.adapters.DIFFUSERS_ADAPTERS`) is
checked against it, so every supported class is one case here.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable

import torch

import diffusers
import tiny_pipelines as tp

STEPS = 3
BATCH = 2


def _seeded(seed: int):
    return torch.random.fork_rng(devices=[]), seed


def _init(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Re-draw every parameter (zero-initialised output layers included), so no branch is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[1] ** 0.5))
            elif p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module.eval()


def _finish(pipe):
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.to(device="cpu", dtype=torch.float32).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _mask(size: int = 32) -> torch.Tensor:
    m = torch.zeros(BATCH, 1, size, size)
    m[:, :, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    return m


def _embeds(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- Stable Diffusion 1.x / 2.x -----------------------------------------------------------------------
@functools.cache
def _sd_parts() -> dict:
    return dict(tp.build("sd").components)


@functools.cache
def _unet_variant(base: str, in_channels: int) -> torch.nn.Module:
    parts = _sd_parts() if base == "sd" else _sdxl_parts()
    config = {**parts["unet"].config, "in_channels": in_channels}
    return _init(diffusers.UNet2DConditionModel.from_config(config), seed=7 + in_channels)


@functools.cache
def _controlnet(base: str) -> torch.nn.Module:
    parts = _sd_parts() if base == "sd" else _sdxl_parts()
    return _init(diffusers.ControlNetModel.from_unet(parts["unet"], conditioning_embedding_out_channels=(4, 8)), 11)


def _sd_like(cls_name: str, base: str, inpaint: bool = False, controlnet: bool = False):
    parts = dict(_sd_parts() if base == "sd" else _sdxl_parts())
    if inpaint:
        parts["unet"] = _unet_variant(base, 9)
    if controlnet:
        parts["controlnet"] = _controlnet(base)
    cls = getattr(diffusers, cls_name)
    accepted = cls.__init__.__code__.co_varnames
    return _finish(cls(**{k: v for k, v in parts.items() if k in accepted}))


def _with_image(kw: dict, image: bool = False, mask: bool = False) -> dict:
    """The img2img (strength 0.75 of 4 steps: 3 run) and inpainting inputs on top of a text-to-image call."""
    if image:
        kw.update(image=_image(), strength=0.75, num_inference_steps=4)
    if mask:
        kw["mask_image"] = _mask()
    return kw


def _sd_kwargs(base: str, image: bool = False, mask: bool = False, control: bool = False) -> dict:
    kw = _with_image(tp.call_kwargs(base), image, mask)
    if control:
        kw["control_image" if image else "image"] = _image(seed=2)
    return kw


@functools.cache
def _sdxl_parts() -> dict:
    return dict(tp.build("sdxl").components)


# --- SD3 ---------------------------------------------------------------------------------------------------
@functools.cache
def _sd3_parts() -> dict:
    return dict(tp.build("sd3").components)


@functools.cache
def _sd3_16ch_parts() -> dict:
    """SD3 inpainting needs the real 16 latent channels (its check refuses 4)."""
    parts = dict(_sd3_parts())
    config = {**parts["transformer"].config, "in_channels": 16, "out_channels": 16}
    parts["transformer"] = _init(diffusers.SD3Transformer2DModel.from_config(config), 41)
    parts["vae"] = _init(diffusers.AutoencoderKL.from_config({**parts["vae"].config, "latent_channels": 16}), 42)
    return parts


def _sd3_kwargs(image: bool = False, mask: bool = False) -> dict:
    return _with_image(tp.call_kwargs("sd3"), image, mask)


# --- Flux and Chroma (packed token latents) ------------------------------------------------------------
@functools.cache
def _flux_parts() -> dict:
    return dict(tp.build("flux").components)


def _flux_kwargs(image: bool = False, mask: bool = False, kontext: bool = False) -> dict:
    kw = _with_image(tp.call_kwargs("flux"), image and not kontext, mask)
    if kontext:
        kw.update(image=_image(), _auto_resize=False, max_area=32 * 32)
    return kw


@functools.cache
def _flux_controlnet() -> torch.nn.Module:
    return _init(diffusers.FluxControlNetModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)), 171)


@functools.cache
def _sd3_controlnet() -> torch.nn.Module:
    return _init(diffusers.SD3ControlNetModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=32), 172)


@functools.cache
def _chroma_parts() -> dict:
    flux = _flux_parts()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(21)
        transformer = diffusers.ChromaTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
            approximator_hidden_dim=32, approximator_layers=1, approximator_num_channels=16)
    return dict(transformer=transformer, vae=flux["vae"], text_encoder=flux["text_encoder_2"],
                tokenizer=flux["tokenizer_2"], scheduler=flux["scheduler"])


def _chroma_kwargs(image: bool = False) -> dict:
    kw = dict(prompt=tp.PROMPTS, negative_prompt=tp.NEGATIVE_PROMPTS, guidance_scale=4.0, height=32, width=32,
              num_inference_steps=STEPS, max_sequence_length=16, output_type="pt")
    return _with_image(kw, image)


# --- AuraFlow -------------------------------------------------------------------------------------------
@functools.cache
def _auraflow_parts() -> dict:
    sd3 = _sd3_parts()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(31)
        transformer = diffusers.AuraFlowTransformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
            attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
            out_channels=4, pos_embed_max_size=64)
    return dict(transformer=transformer, vae=_sd_parts()["vae"], text_encoder=sd3["text_encoder_3"],
                tokenizer=sd3["tokenizer_3"], scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def _auraflow_kwargs() -> dict:
    return dict(prompt=tp.PROMPTS, guidance_scale=4.0, height=32, width=32, num_inference_steps=STEPS,
                max_sequence_length=16, output_type="pt")


# --- families fed with prompt embeddings (no tiny offline tokenizer / text encoder needed) ----------------
def _make(cls_name: str, **parts):
    """The pipeline class with the given components; every other component None."""
    cls = getattr(diffusers, cls_name)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return _finish(cls(**{p.name: parts[p.name] if p.name in parts else (None if p.default is p.empty else p.default)
                          for p in params}))


def _new(factory: Callable, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().eval()


def _text(dim: int, seed: int, length: int = 8, mask: str | None = None, prefix: str = "") -> dict:
    """prompt / negative prompt embeddings (batch 2) and, if named, their attention masks."""
    kw = {f"{prefix}prompt_embeds": _embeds(BATCH, length, dim, seed=seed),
          f"negative_{prefix}prompt_embeds": _embeds(BATCH, length, dim, seed=seed + 1)}
    if mask:
        ones = torch.ones(BATCH, length, dtype=torch.long)
        kw[f"{prefix}{mask}"] = ones
        kw[f"negative_{prefix}{mask}"] = ones.clone()
    return kw


def _latent_call(**kw) -> dict:
    return dict(num_inference_steps=STEPS, output_type="latent", **kw)


@functools.cache
def _wan_transformer(seed: int) -> torch.nn.Module:
    return _new(lambda: diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=1, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32), seed)


def _wan(two_experts: bool = False):
    parts = dict(transformer=_wan_transformer(51), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
                 vae=_wan_vae())
    if two_experts:  # Wan 2.2: transformer for high noise, transformer_2 below the boundary
        parts.update(transformer_2=_wan_transformer(52), boundary_ratio=0.5)
    return _make("WanPipeline", **parts)


@functools.cache
def _wan_vae() -> torch.nn.Module:
    return _new(lambda: diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                                   temperal_downsample=[False, True, True]), 53)


def _wan_kwargs(two_experts: bool = False) -> dict:
    kw = _latent_call(height=16, width=16, num_frames=5, guidance_scale=5.0, **_text(32, 54))
    if two_experts:
        kw["guidance_scale_2"] = 3.0
    return kw


@functools.cache
def _qwen_parts() -> dict:
    transformer = _new(lambda: diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4)), 61)
    vae = _new(lambda: diffusers.AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4), 62)
    return dict(transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def _qwen_kwargs(image: bool = False, mask: bool = False) -> dict:
    kw = _latent_call(height=32, width=32, true_cfg_scale=4.0, **_text(16, 63, mask="prompt_embeds_mask"))
    return _with_image(kw, image, mask)


@functools.cache
def _ltx_parts() -> dict:
    transformer = _new(lambda: diffusers.LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=1, caption_channels=32), 71)
    vae = _new(lambda: diffusers.AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False), 72)
    return dict(transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def _ltx_kwargs(image: bool = False) -> dict:
    kw = _latent_call(height=32, width=32, num_frames=9, guidance_scale=3.0,
                      **_text(32, 73, mask="prompt_attention_mask"))
    if image:
        kw["image"] = _image()
    return kw


@functools.cache
def _cogvideox_parts() -> dict:
    transformer = _new(lambda: diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
        text_embed_dim=32, num_layers=1, sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8), 81)
    vae = _new(lambda: diffusers.AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4), 82)
    return dict(transformer=transformer, vae=vae, scheduler=diffusers.CogVideoXDDIMScheduler())


def _cogvideox_kwargs() -> dict:
    return _latent_call(height=16, width=16, num_frames=9, guidance_scale=6.0, **_text(32, 83))


@functools.cache
def _sana_parts() -> dict:
    transformer = _new(lambda: diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=32), 91)
    vae = _new(lambda: diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407), 92)
    return dict(transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0))


def _sana_kwargs() -> dict:
    return _latent_call(height=32, width=32, guidance_scale=4.5, use_resolution_binning=False,
                        complex_human_instruction=None, negative_prompt=None, **_text(8, 93, mask="prompt_attention_mask"))


@functools.cache
def _hunyuandit_parts() -> dict:
    transformer = _new(lambda: diffusers.HunyuanDiT2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, in_channels=4,
        cross_attention_dim=32, cross_attention_dim_t5=32, pooled_projection_dim=16, hidden_size=24,
        activation_fn="gelu-approximate"), 101)
    # No VAE (latent output): the pipeline's rotary grid assumes its default VAE factor 8.
    return dict(transformer=transformer, scheduler=diffusers.DDPMScheduler())


def _hunyuandit_kwargs() -> dict:
    kw = _latent_call(height=32, width=32, guidance_scale=5.0, use_resolution_binning=False,
                      **_text(32, 103, length=77, mask="prompt_attention_mask"))
    second = _text(32, 105, length=256, mask="prompt_attention_mask_2")  # the lengths its text embedder expects
    kw.update(prompt_embeds_2=second["prompt_embeds"], negative_prompt_embeds_2=second["negative_prompt_embeds"],
              prompt_attention_mask_2=second["prompt_attention_mask_2"],
              negative_prompt_attention_mask_2=second["negative_prompt_attention_mask_2"])
    return kw


@functools.cache
def _lumina2_parts() -> dict:
    transformer = _new(lambda: diffusers.Lumina2Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=8, num_layers=2, num_attention_heads=1,
        num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0,
        axes_dim_rope=[4, 2, 2], cap_feat_dim=8), 111)
    return dict(transformer=transformer, vae=_sd_parts()["vae"], scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def _lumina2_kwargs() -> dict:
    return _latent_call(height=32, width=32, guidance_scale=4.0, **_text(8, 113, mask="prompt_attention_mask"))


@functools.cache
def _cogview4_parts() -> dict:
    transformer = _new(lambda: diffusers.CogView4Transformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4, out_channels=4,
        text_embed_dim=32, time_embed_dim=8, condition_dim=4), 121)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                          use_dynamic_shifting=True, time_shift_type="linear")
    return dict(transformer=transformer, vae=_sd_parts()["vae"], scheduler=scheduler)


def _cogview4_kwargs() -> dict:
    return _latent_call(height=32, width=32, guidance_scale=4.0, **_text(32, 123))


# --- AnimateDiff: the SD components plus a motion adapter (5-D latents (B, C, F, H, W)) ------------------
@functools.cache
def _motion_adapter() -> torch.nn.Module:
    return _init(diffusers.MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1,
                                         motion_norm_num_groups=4, motion_num_attention_heads=2), 151)


def _animatediff(cls_name: str):
    parts = dict(_sd_parts(), motion_adapter=_motion_adapter())
    return _make(cls_name, **{k: v for k, v in parts.items() if k not in ("safety_checker",)})


def _animatediff_kwargs(video: bool = False) -> dict:
    kw = dict(prompt=tp.PROMPTS, guidance_scale=7.5, height=32, width=32, num_frames=4,
              num_inference_steps=STEPS, output_type="latent")
    if video:
        del kw["num_frames"]
        frames = list(_image(32, seed=152))  # two (3, H, W) frames
        kw.update(video=[frames * 2, frames[::-1] * 2], strength=0.75, num_inference_steps=4)  # one video per prompt
    return kw


# --- Kandinsky 2.2 decoders (image embeddings from the prior, passed in) ------------------------------
@functools.cache
def _kandinsky_unet(in_channels: int) -> torch.nn.Module:
    return _new(lambda: diffusers.UNet2DConditionModel(
        in_channels=in_channels, out_channels=8, addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
        encoder_hid_dim=32, encoder_hid_dim_type="image_proj", cross_attention_dim=32, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", class_embed_type=None), 131 + in_channels)


@functools.cache
def _movq() -> torch.nn.Module:
    return _new(lambda: diffusers.VQModel(
        block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
        num_vq_embeddings=12, out_channels=3, up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
        vq_embed_dim=4), 139)


def _kandinsky(cls_name: str, in_channels: int = 4):
    scheduler = diffusers.DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012,
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return _make(cls_name, unet=_kandinsky_unet(in_channels), movq=_movq(), scheduler=scheduler)


def _kandinsky_kwargs(image: bool = False, mask: bool = False) -> dict:
    kw = dict(image_embeds=_embeds(BATCH, 32, seed=141), negative_image_embeds=_embeds(BATCH, 32, seed=142),
              height=32, width=32, guidance_scale=4.0, num_inference_steps=STEPS, output_type="pt")
    _with_image(kw, image)
    if mask:  # Kandinsky's mask is single-channel and runs every step
        kw.update(mask_image=_mask()[:, 0], strength=1.0, num_inference_steps=STEPS)
    return kw


@functools.cache
def _lumina_parts() -> dict:
    transformer = _new(lambda: diffusers.LuminaNextDiT2DModel(
        sample_size=4, patch_size=2, in_channels=4, hidden_size=4, num_layers=2, num_attention_heads=1,
        num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, learn_sigma=True, qk_norm=True,
        cross_attention_dim=8, scaling_factor=1.0), 161)
    return dict(transformer=transformer, vae=_sd_parts()["vae"], scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def _lumina_kwargs() -> dict:
    return _latent_call(height=32, width=32, guidance_scale=4.0, **_text(8, 163, mask="prompt_attention_mask"))


# --- the cases --------------------------------------------------------------------------------------------
Case = tuple[Callable[[], Any], Callable[[], dict]]


def _case(build: Callable, kwargs: Callable) -> Case:
    return build, kwargs


CASES: dict[str, Case] = {
    "StableDiffusionPipeline": _case(lambda: _sd_like("StableDiffusionPipeline", "sd"), lambda: _sd_kwargs("sd")),
    "StableDiffusionImg2ImgPipeline": _case(lambda: _sd_like("StableDiffusionImg2ImgPipeline", "sd"),
                                            lambda: _sd_kwargs("sd", image=True)),
    "StableDiffusionInpaintPipeline": _case(lambda: _sd_like("StableDiffusionInpaintPipeline", "sd", inpaint=True),
                                            lambda: _sd_kwargs("sd", image=True, mask=True)),
    "StableDiffusionControlNetPipeline": _case(
        lambda: _sd_like("StableDiffusionControlNetPipeline", "sd", controlnet=True),
        lambda: _sd_kwargs("sd", control=True)),
    "StableDiffusionControlNetImg2ImgPipeline": _case(
        lambda: _sd_like("StableDiffusionControlNetImg2ImgPipeline", "sd", controlnet=True),
        lambda: _sd_kwargs("sd", image=True, control=True)),
    "StableDiffusionControlNetInpaintPipeline": _case(
        lambda: _sd_like("StableDiffusionControlNetInpaintPipeline", "sd", inpaint=True, controlnet=True),
        lambda: _sd_kwargs("sd", image=True, mask=True, control=True)),
    "StableDiffusionXLPipeline": _case(lambda: _sd_like("StableDiffusionXLPipeline", "sdxl"),
                                       lambda: _sd_kwargs("sdxl")),
    "StableDiffusionXLImg2ImgPipeline": _case(lambda: _sd_like("StableDiffusionXLImg2ImgPipeline", "sdxl"),
                                              lambda: _sd_kwargs("sdxl", image=True)),
    "StableDiffusionXLInpaintPipeline": _case(
        lambda: _sd_like("StableDiffusionXLInpaintPipeline", "sdxl", inpaint=True),
        lambda: _sd_kwargs("sdxl", image=True, mask=True)),
    "StableDiffusionXLControlNetPipeline": _case(
        lambda: _sd_like("StableDiffusionXLControlNetPipeline", "sdxl", controlnet=True),
        lambda: _sd_kwargs("sdxl", control=True)),
    "StableDiffusionXLControlNetImg2ImgPipeline": _case(
        lambda: _sd_like("StableDiffusionXLControlNetImg2ImgPipeline", "sdxl", controlnet=True),
        lambda: _sd_kwargs("sdxl", image=True, control=True)),
    "StableDiffusionXLControlNetInpaintPipeline": _case(
        lambda: _sd_like("StableDiffusionXLControlNetInpaintPipeline", "sdxl", inpaint=True, controlnet=True),
        lambda: _sd_kwargs("sdxl", image=True, mask=True, control=True)),
    "StableDiffusion3Pipeline": _case(lambda: _finish(diffusers.StableDiffusion3Pipeline(**_sd3_parts())),
                                      _sd3_kwargs),
    "StableDiffusion3Img2ImgPipeline": _case(
        lambda: _finish(diffusers.StableDiffusion3Img2ImgPipeline(**_sd3_parts())), lambda: _sd3_kwargs(image=True)),
    "StableDiffusion3InpaintPipeline": _case(
        lambda: _finish(diffusers.StableDiffusion3InpaintPipeline(**_sd3_16ch_parts())),
        lambda: _sd3_kwargs(image=True, mask=True)),
    "PixArtAlphaPipeline": _case(lambda: tp.build("pixart_alpha"), lambda: tp.call_kwargs("pixart_alpha")),
    "PixArtSigmaPipeline": _case(lambda: tp.build("pixart_sigma"), lambda: tp.call_kwargs("pixart_sigma")),
    "DiTPipeline": _case(lambda: tp.build("dit"), lambda: tp.call_kwargs("dit")),
    "FluxPipeline": _case(lambda: _finish(diffusers.FluxPipeline(**_flux_parts())), _flux_kwargs),
    "FluxImg2ImgPipeline": _case(lambda: _finish(diffusers.FluxImg2ImgPipeline(**_flux_parts())),
                                 lambda: _flux_kwargs(image=True)),
    "FluxInpaintPipeline": _case(lambda: _finish(diffusers.FluxInpaintPipeline(**_flux_parts())),
                                 lambda: _flux_kwargs(image=True, mask=True)),
    "FluxKontextPipeline": _case(lambda: _finish(diffusers.FluxKontextPipeline(**_flux_parts())),
                                 lambda: _flux_kwargs(kontext=True)),
    "ChromaPipeline": _case(lambda: _finish(diffusers.ChromaPipeline(**_chroma_parts())), _chroma_kwargs),
    "ChromaImg2ImgPipeline": _case(lambda: _finish(diffusers.ChromaImg2ImgPipeline(**_chroma_parts())),
                                   lambda: _chroma_kwargs(image=True)),
    "AuraFlowPipeline": _case(lambda: _finish(diffusers.AuraFlowPipeline(**_auraflow_parts())), _auraflow_kwargs),
    "WanPipeline": _case(_wan, _wan_kwargs),
    "QwenImagePipeline": _case(lambda: _make("QwenImagePipeline", **_qwen_parts()), _qwen_kwargs),
    "LTXPipeline": _case(lambda: _make("LTXPipeline", **_ltx_parts()), _ltx_kwargs),
    "CogVideoXPipeline": _case(lambda: _make("CogVideoXPipeline", **_cogvideox_parts()), _cogvideox_kwargs),
    "SanaPipeline": _case(lambda: _make("SanaPipeline", **_sana_parts()), _sana_kwargs),
    "HunyuanDiTPipeline": _case(lambda: _make("HunyuanDiTPipeline", **_hunyuandit_parts()), _hunyuandit_kwargs),
    "Lumina2Pipeline": _case(lambda: _make("Lumina2Pipeline", **_lumina2_parts()), _lumina2_kwargs),
    "CogView4Pipeline": _case(lambda: _make("CogView4Pipeline", **_cogview4_parts()), _cogview4_kwargs),
}

CASES.update({
    "FluxControlNetPipeline": _case(
        lambda: _finish(diffusers.FluxControlNetPipeline(**_flux_parts(), controlnet=_flux_controlnet())),
        lambda: {**_flux_kwargs(), "control_image": _image(seed=4)}),
    "StableDiffusion3ControlNetPipeline": _case(
        lambda: _make("StableDiffusion3ControlNetPipeline", **_sd3_parts(), controlnet=_sd3_controlnet()),
        lambda: {**_sd3_kwargs(), "control_image": _image(seed=5)}),
    "StableDiffusionDepth2ImgPipeline": _case(
        lambda: _make("StableDiffusionDepth2ImgPipeline", **{**_sd_parts(), "unet": _unet_variant("sd", 5)}),
        lambda: {k: v for k, v in _sd_kwargs("sd", image=True).items() if k not in ("height", "width")}
        | {"depth_map": _image(16, seed=6)[:, 0]}),
    "LuminaPipeline": _case(lambda: _make("LuminaPipeline", **_lumina_parts()), _lumina_kwargs),
    "AnimateDiffPipeline": _case(lambda: _animatediff("AnimateDiffPipeline"), _animatediff_kwargs),
    "AnimateDiffVideoToVideoPipeline": _case(lambda: _animatediff("AnimateDiffVideoToVideoPipeline"),
                                             lambda: _animatediff_kwargs(video=True)),
    "QwenImageImg2ImgPipeline": _case(lambda: _make("QwenImageImg2ImgPipeline", **_qwen_parts()),
                                      lambda: _qwen_kwargs(image=True)),
    "QwenImageInpaintPipeline": _case(lambda: _make("QwenImageInpaintPipeline", **_qwen_parts()),
                                      lambda: _qwen_kwargs(image=True, mask=True)),
    "FluxKontextInpaintPipeline": _case(lambda: _finish(diffusers.FluxKontextInpaintPipeline(**_flux_parts())),
                                        lambda: {**_flux_kwargs(kontext=True), "mask_image": _mask(),
                                                 "image_reference": _image(seed=3)}),
    "LTXImageToVideoPipeline": _case(lambda: _make("LTXImageToVideoPipeline", **_ltx_parts()),
                                     lambda: _ltx_kwargs(image=True)),
    "KandinskyV22Pipeline": _case(lambda: _kandinsky("KandinskyV22Pipeline"), _kandinsky_kwargs),
    "KandinskyV22Img2ImgPipeline": _case(lambda: _kandinsky("KandinskyV22Img2ImgPipeline"),
                                         lambda: _kandinsky_kwargs(image=True)),
    "KandinskyV22InpaintPipeline": _case(lambda: _kandinsky("KandinskyV22InpaintPipeline", in_channels=9),
                                         lambda: _kandinsky_kwargs(image=True, mask=True)),
})

# PAG variants: the same components; called with pag_scale=0 (PAG's third branch is refused, tested apart).
_PAG = {
    "StableDiffusionPAGPipeline": ("StableDiffusionPipeline", "sd", {}),
    "StableDiffusionPAGImg2ImgPipeline": ("StableDiffusionImg2ImgPipeline", "sd", {}),
    "StableDiffusionPAGInpaintPipeline": ("StableDiffusionInpaintPipeline", "sd", dict(inpaint=True)),
    "StableDiffusionControlNetPAGPipeline": ("StableDiffusionControlNetPipeline", "sd", dict(controlnet=True)),
    "StableDiffusionControlNetPAGInpaintPipeline": ("StableDiffusionControlNetInpaintPipeline", "sd",
                                                    dict(inpaint=True, controlnet=True)),
    "StableDiffusionXLPAGPipeline": ("StableDiffusionXLPipeline", "sdxl", {}),
    "StableDiffusionXLPAGImg2ImgPipeline": ("StableDiffusionXLImg2ImgPipeline", "sdxl", {}),
    "StableDiffusionXLPAGInpaintPipeline": ("StableDiffusionXLInpaintPipeline", "sdxl", dict(inpaint=True)),
    "StableDiffusionXLControlNetPAGPipeline": ("StableDiffusionXLControlNetPipeline", "sdxl", dict(controlnet=True)),
    "StableDiffusionXLControlNetPAGImg2ImgPipeline": ("StableDiffusionXLControlNetImg2ImgPipeline", "sdxl",
                                                      dict(controlnet=True)),
}


def _pag_kwargs(name: str, base: str) -> dict:
    accepted = inspect.signature(getattr(diffusers, name).__call__).parameters
    return {k: v for k, v in {**CASES[base][1](), "pag_scale": 0.0}.items() if k in accepted}


def _pag_case(name: str, base: str, family: str, options: dict) -> Case:
    return _case(lambda: _sd_like(name, family, **options), lambda: _pag_kwargs(name, base))


def _pag_make(name: str, base: str, parts: Callable) -> Case:
    return _case(lambda: _make(name, **parts()), lambda: _pag_kwargs(name, base))


CASES.update({name: _pag_case(name, *spec) for name, spec in _PAG.items()})
CASES.update({
    "StableDiffusion3PAGPipeline": _pag_make("StableDiffusion3PAGPipeline", "StableDiffusion3Pipeline", _sd3_parts),
    "StableDiffusion3PAGImg2ImgPipeline": _pag_make("StableDiffusion3PAGImg2ImgPipeline",
                                                    "StableDiffusion3Img2ImgPipeline", _sd3_parts),
    "PixArtSigmaPAGPipeline": _pag_make("PixArtSigmaPAGPipeline", "PixArtSigmaPipeline",
                                        lambda: tp.build("pixart_sigma").components),
    "SanaPAGPipeline": _pag_make("SanaPAGPipeline", "SanaPipeline", _sana_parts),
    "HunyuanDiTPAGPipeline": _pag_make("HunyuanDiTPAGPipeline", "HunyuanDiTPipeline", _hunyuandit_parts),
})

# The families' own files (each imports this module's helpers lazily, inside its builders).
for _family in ("zoo_unet", "zoo_unet_video", "zoo_video", "zoo_image", "zoo_cascades", "zoo_misc", "zoo_image2",
                "zoo_hidream", "zoo_unclip", "zoo_wuerstchen", "zoo_preconditioned", "zoo_audio_pixel",
                "zoo_cosmos"):
    CASES.update(importlib.import_module(_family).CASES)

# Wan 2.2 (two experts, guidance_scale_2) is the same class as Wan 2.1: an extra case, not an extra row.
EXTRA_CASES: dict[str, Case] = {"WanPipeline[2.2 two experts]": _case(lambda: _wan(True), lambda: _wan_kwargs(True))}
# Stable Cascade under a DDPM scheduler (it steps those with their own timesteps, not the denoiser's ratio).
EXTRA_CASES.update(importlib.import_module("zoo_wuerstchen").EXTRA_CASES)


ALL_CASES = {**CASES, **EXTRA_CASES}


def build(name: str):
    with torch.random.fork_rng(devices=[]):
        return ALL_CASES[name][0]()


def call_kwargs(name: str) -> dict:
    return ALL_CASES[name][1]()


def denoisers(pipe) -> list[torch.nn.Module]:
    from pipelines.adapters import adapter_for

    return [m for m in (getattr(pipe, a, None) for a in adapter_for(pipe).denoisers) if m is not None]
