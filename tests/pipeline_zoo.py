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


def _sd_kwargs(base: str, image: bool = False, mask: bool = False, control: bool = False) -> dict:
    kw = tp.call_kwargs(base)
    if image:
        kw.update(image=_image(), strength=0.75, num_inference_steps=4)  # 3 steps run
    if mask:
        kw["mask_image"] = _mask()
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
    kw = tp.call_kwargs("sd3")
    if image:
        kw.update(image=_image(), strength=0.75, num_inference_steps=4)
    if mask:
        kw["mask_image"] = _mask()
    return kw


# --- Flux and Chroma (packed token latents) ------------------------------------------------------------
@functools.cache
def _flux_parts() -> dict:
    return dict(tp.build("flux").components)


def _flux_kwargs(image: bool = False, mask: bool = False, kontext: bool = False) -> dict:
    kw = tp.call_kwargs("flux")
    if image and not kontext:
        kw.update(image=_image(), strength=0.75, num_inference_steps=4)
    if kontext:
        kw.update(image=_image(), _auto_resize=False, max_area=32 * 32)
    if mask:
        kw["mask_image"] = _mask()
    return kw


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
    if image:
        kw.update(image=_image(), strength=0.75, num_inference_steps=4)
    return kw


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
}


def build(name: str):
    with torch.random.fork_rng(devices=[]):
        return CASES[name][0]()


def call_kwargs(name: str) -> dict:
    return CASES[name][1]()


def denoisers(pipe) -> list[torch.nn.Module]:
    from pipelines.adapters import adapter_for

    return [m for m in (getattr(pipe, a, None) for a in adapter_for(pipe).denoisers) if m is not None]
