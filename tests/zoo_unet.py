"""Tiny pipelines of the unet family for tests/test_pipeline_zoo.py (rows in pipelines/adapters.py's unet block).

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


@functools.cache
def _unet_like(base: str, seed: int, **changes) -> torch.nn.Module:
    """The SD / SDXL tiny UNet's config with a few changes, random weights."""
    parts = zoo._sd_parts() if base == "sd" else zoo._sdxl_parts()
    config = {k: v for k, v in parts["unet"].config.items() if k != "_use_default_values"}
    return zoo._init(diffusers.UNet2DConditionModel.from_config({**config, **changes}), seed)


def _parts_with_unet(base: str, unet: torch.nn.Module) -> dict:
    return {**(zoo._sd_parts() if base == "sd" else zoo._sdxl_parts()), "unet": unet}


# --- Kolors: the SDXL UNet fed with ChatGLM-sized prompt embeddings (no text encoder needed) -------------
def _kolors(cls_name: str):
    sdxl = zoo._sdxl_parts()
    return zoo._make(cls_name, unet=sdxl["unet"], vae=sdxl["vae"], scheduler=sdxl["scheduler"])


def _kolors_kwargs(image: bool = False, pag: bool = False) -> dict:
    kw = zoo._latent_call(height=32, width=32, guidance_scale=5.0, **zoo._text(64, 201),
                          pooled_prompt_embeds=zoo._embeds(zoo.BATCH, 32, seed=203),
                          negative_pooled_prompt_embeds=zoo._embeds(zoo.BATCH, 32, seed=204))
    if pag:
        kw["pag_scale"] = 0.0
    return zoo._with_image(kw, image)


@functools.cache
def _chatglm() -> tuple:
    """A tiny ChatGLM text encoder and its tokenizer (a sentencepiece model trained here on the test prompts)."""
    import io
    import os
    import tempfile

    import sentencepiece

    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(zoo.tp.PROMPTS + zoo.tp.NEGATIVE_PROMPTS) * 20), model_writer=model,
        vocab_size=40, model_type="unigram", hard_vocab_limit=False, minloglevel=2)
    path = os.path.join(tempfile.mkdtemp(prefix="tiny-chatglm-"), "tokenizer.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    tokenizer = ChatGLMTokenizer(vocab_file=path)
    config = ChatGLMConfig(num_layers=1, padded_vocab_size=len(tokenizer) + 8, hidden_size=64, ffn_hidden_size=37,
                           kv_channels=16, num_attention_heads=4, seq_length=256, multi_query_attention=True,
                           multi_query_group_num=2, original_rope=True)
    model = ChatGLMModel(config)  # its parameters are left uninitialised (torch.empty): draw them all
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # the RMSNorm scales (the only 1-d parameters)
    return zoo._init(model, 205), tokenizer


def _kolors_img2img():
    """KolorsImg2ImgPipeline drops the call's pooled_prompt_embeds (diffusers 0.42.1 does not pass them to
    encode_prompt), so it runs its ChatGLM text encoder; pooled embeddings are its hidden size (64)."""
    sdxl = zoo._sdxl_parts()
    text_encoder, tokenizer = _chatglm()
    unet = _unet_like("sdxl", 206, projection_class_embeddings_input_dim=6 * 8 + 64)
    return zoo._make("KolorsImg2ImgPipeline", unet=unet, vae=sdxl["vae"], scheduler=sdxl["scheduler"],
                     text_encoder=text_encoder, tokenizer=tokenizer)


def _kolors_img2img_kwargs() -> dict:
    kw = zoo._latent_call(prompt=zoo.tp.PROMPTS, negative_prompt=zoo.tp.NEGATIVE_PROMPTS, guidance_scale=5.0)
    return zoo._with_image(kw, image=True)


# --- SDXL ControlNet-Union ------------------------------------------------------------------------------
@functools.cache
def _union_controlnet() -> torch.nn.Module:
    unet = zoo._sdxl_parts()["unet"]
    config = diffusers.ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8)).config
    # the union's control transformer is 320 wide by default: as wide as the first block here
    config = {**{k: v for k, v in config.items() if k != "_use_default_values"},  # else from_config drops these
              "num_trans_channel": 8, "num_trans_head": 2, "num_proj_channel": 8}
    return zoo._init(diffusers.ControlNetUnionModel.from_config(config), 211)


def _union(cls_name: str):
    return zoo._make(cls_name, **_without(zoo._sdxl_parts(), "feature_extractor", "image_encoder"),
                     controlnet=_union_controlnet())


def _union_kwargs(image: bool = False, mask: bool = False) -> dict:
    kw = zoo._sd_kwargs("sdxl", image=image, mask=mask)
    # the random union ControlNet's residuals dwarf the text's effect (guidance_rescale would change ~nothing)
    kw.update(control_image=[zoo._image(seed=212)], control_mode=[1], controlnet_conditioning_scale=0.1,
              output_type="latent")
    return kw


# --- T2I-Adapter: its residuals enter the first down block inside (a cross-attention block) -------------
_ADAPTER_UNET = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@functools.cache
def _t2i_adapter(base: str) -> torch.nn.Module:
    return zoo._new(lambda: diffusers.T2IAdapter(in_channels=3, channels=[8, 16], num_res_blocks=1,
                                                 downscale_factor=2, adapter_type="full_adapter"),
                    221 if base == "sd" else 222)


def _adapter(cls_name: str, base: str):
    unet = _unet_like(base, 224, **_ADAPTER_UNET)
    return zoo._make(cls_name, **_parts_with_unet(base, unet), adapter=_t2i_adapter(base))


def _adapter_kwargs(base: str) -> dict:
    return {**zoo._sd_kwargs(base), "image": zoo._image(seed=223), "output_type": "latent"}


# --- ControlNet-XS (the pipeline fuses the UNet and the adapter into a UNetControlNetXSModel) ------------
def _xs_unet(base: str) -> torch.nn.Module:
    return _unet_like(base, 233, layers_per_block=2)  # UNetControlNetXSModel supports 2 layers per block only


@functools.cache
def _controlnet_xs(base: str) -> torch.nn.Module:
    unet = _xs_unet(base)
    return zoo._init(diffusers.ControlNetXSAdapter.from_unet(unet, size_ratio=0.5,
                                                             conditioning_embedding_out_channels=(4, 8)), 231)


def _xs(cls_name: str, base: str):
    return zoo._make(cls_name, **_parts_with_unet(base, _xs_unet(base)), controlnet=_controlnet_xs(base))


def _xs_kwargs(base: str) -> dict:
    return {**zoo._sd_kwargs(base), "image": zoo._image(seed=232), "output_type": "latent"}


# --- SD variants on the SD components -------------------------------------------------------------------
def _sd_variant(cls_name: str, **changes):
    return zoo._make(cls_name, **{**zoo._sd_parts(), **changes})


def _sd_latent_kwargs(**kw) -> dict:
    return {**zoo._sd_kwargs("sd"), "output_type": "latent", **kw}


@functools.cache
def _clip_vision(projection_dim: int = 32) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, projection_dim=projection_dim, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=4)
    return zoo._new(lambda: CLIPVisionModelWithProjection(config), 241)


@functools.cache
def _paint_by_example_encoder() -> torch.nn.Module:
    from transformers import CLIPVisionConfig

    from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder

    config = CLIPVisionConfig(hidden_size=32, projection_dim=32, num_hidden_layers=4, num_attention_heads=4,
                              intermediate_size=37, image_size=32, patch_size=4)
    return zoo._new(lambda: PaintByExampleImageEncoder(config, proj_size=32), 242)


def _upscale():
    sd = zoo._sd_parts()
    unet = _unet_like("sd", 251, in_channels=7, num_class_embeds=400)  # latents + low-res image; noise-level ids
    return zoo._make("StableDiffusionUpscalePipeline", **_without(sd, "unet", "safety_checker", "feature_extractor"),
                     unet=unet, low_res_scheduler=diffusers.DDPMScheduler())


def _upscale_kwargs() -> dict:
    kw = {k: v for k, v in _sd_latent_kwargs().items() if k not in ("height", "width")}
    return {**kw, "image": zoo._image(16, seed=252)}


def _ldm3d():
    """LDM3D post-processes to numpy / PIL only ("latent" and "pt" raise): its RGB as a tensor, for the test."""

    class TensorOutput(diffusers.image_processor.VaeImageProcessorLDM3D):
        def postprocess(self, image, output_type="np", do_denormalize=None):
            rgb, depth = super().postprocess(image, output_type, do_denormalize)
            return torch.from_numpy(rgb), torch.from_numpy(depth)

    pipe = _sd_variant("StableDiffusionLDM3DPipeline")
    pipe.image_processor = TensorOutput(vae_scale_factor=pipe.vae_scale_factor)
    return pipe


@functools.cache
def _gligen_unet() -> torch.nn.Module:
    return _unet_like("sd", 261, attention_type="gated")


def _gligen_kwargs() -> dict:
    return _sd_latent_kwargs(gligen_phrases=["a cat", "a car"],
                             gligen_boxes=[[0.1, 0.1, 0.5, 0.5], [0.5, 0.4, 0.9, 0.9]])


# --- Kandinsky 2.2 ControlNet: the UNet appends the encoded hint (4 channels, 1/8 of the hint's size) -----
@functools.cache
def _kandinsky_hint_unet() -> torch.nn.Module:
    config = {k: v for k, v in zoo._kandinsky_unet(4).config.items() if k != "_use_default_values"}
    return zoo._new(lambda: diffusers.UNet2DConditionModel.from_config(
        {**config, "in_channels": 8, "addition_embed_type": "image_hint"}), 291)


def _kandinsky_controlnet(cls_name: str):
    pipe = zoo._kandinsky(cls_name)
    pipe.register_modules(unet=_kandinsky_hint_unet())
    return pipe


def _kandinsky_controlnet_kwargs(image: bool = False) -> dict:
    return {**zoo._kandinsky_kwargs(image=image), "hint": zoo._image(128, seed=292)}  # 1/8 of it: the 16x16 latents


# --- Stable unCLIP: the noised CLIP image embedding (and its noise level) enter the UNet as class labels ----
@functools.cache
def _unclip_parts() -> dict:
    from diffusers.pipelines.stable_diffusion import StableUnCLIPImageNormalizer

    sd = zoo._sd_parts()
    unet = _unet_like("sd", 301, class_embed_type="projection", projection_class_embeddings_input_dim=64)
    return dict(tokenizer=sd["tokenizer"], text_encoder=sd["text_encoder"], unet=unet, scheduler=sd["scheduler"],
                vae=sd["vae"], image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=32),
                image_noising_scheduler=diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"))


def _unclip_make(cls_name: str, **parts):
    """zoo._make, the normalizer registered after zoo._finish (its .to() takes torch_device, not device)."""
    parts = {**_unclip_parts(), **parts}
    normalizer = parts.pop("image_normalizer")
    pipe = zoo._make(cls_name, **parts)
    pipe.register_modules(image_normalizer=normalizer)
    return pipe


@functools.cache
def _unclip_prior() -> torch.nn.Module:
    return zoo._new(lambda: diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=32,
                                                       num_layers=1), 302)


def _stable_unclip():
    sdxl = zoo._sdxl_parts()  # its second text encoder has a 32-d projection: the prior's text encoder
    prior_scheduler = diffusers.DDPMScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                              clip_sample=True, clip_sample_range=5.0,
                                              beta_schedule="squaredcos_cap_v2")
    return _unclip_make("StableUnCLIPPipeline", prior=_unclip_prior(), prior_scheduler=prior_scheduler,
                        prior_tokenizer=sdxl["tokenizer_2"], prior_text_encoder=sdxl["text_encoder_2"])


# --- LDM text-to-image (LDMBert text encoder) -------------------------------------------------------------
@functools.cache
def _ldm_bert() -> torch.nn.Module:
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    config = LDMBertConfig(vocab_size=len(zoo._sd_parts()["tokenizer"]), d_model=32, encoder_layers=1,
                           encoder_ffn_dim=37, encoder_attention_heads=2, head_dim=16, max_position_embeddings=77)
    return zoo._new(lambda: LDMBertModel(config), 311)


def _ldm_text_to_image():
    sd = zoo._sd_parts()
    # The SD VAE decodes in place of the VQ-VAE: the same decode() interface, and no codebook lookup that a
    # rounding difference in the latents could flip (the pipeline has no latent output).
    return zoo._make("LDMTextToImagePipeline", vqvae=sd["vae"], bert=_ldm_bert(), tokenizer=sd["tokenizer"],
                     unet=sd["unet"], scheduler=sd["scheduler"])


# --- Kandinsky 2.1 decoders: M-CLIP text encoder + image embeddings from the prior (passed in) --------------
@functools.cache
def _mclip() -> torch.nn.Module:
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP

    config = MCLIPConfig(transformerDimSize=32, imageDimSize=32, hidden_size=32, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=80,
                         vocab_size=len(zoo._sd_parts()["tokenizer"]))
    return zoo._new(lambda: MultilingualCLIP(config), 321)


@functools.cache
def _kandinsky21_unet(in_channels: int) -> torch.nn.Module:
    config = {k: v for k, v in zoo._kandinsky_unet(4).config.items() if k != "_use_default_values"}
    return zoo._new(lambda: diffusers.UNet2DConditionModel.from_config(
        {**config, "in_channels": in_channels, "addition_embed_type": "text_image",
         "encoder_hid_dim_type": "text_image_proj"}), 322 + in_channels)


def _kandinsky21(cls_name: str, in_channels: int = 4):
    pipe = zoo._kandinsky(cls_name)
    # a CLIP tokenizer stands in for XLM-R's (M-CLIP only needs ids and an attention mask)
    pipe.register_modules(unet=_kandinsky21_unet(in_channels), text_encoder=_mclip(),
                          tokenizer=zoo._sd_parts()["tokenizer"])
    return pipe


def _kandinsky21_kwargs(image: bool = False, mask: bool = False) -> dict:
    kw = {**zoo._kandinsky_kwargs(image=image, mask=mask), "prompt": zoo.tp.PROMPTS}
    if mask:
        del kw["strength"]  # 2.1 inpainting runs every step from noise
    return kw


CASES: dict = {
    "KolorsPipeline": zoo._case(lambda: _kolors("KolorsPipeline"), _kolors_kwargs),
    "KolorsImg2ImgPipeline": zoo._case(_kolors_img2img, _kolors_img2img_kwargs),
    "KolorsPAGPipeline": zoo._case(lambda: _kolors("KolorsPAGPipeline"), lambda: _kolors_kwargs(pag=True)),
    "StableDiffusionXLControlNetUnionPipeline": zoo._case(
        lambda: _union("StableDiffusionXLControlNetUnionPipeline"), _union_kwargs),
    "StableDiffusionXLControlNetUnionImg2ImgPipeline": zoo._case(
        lambda: _union("StableDiffusionXLControlNetUnionImg2ImgPipeline"), lambda: _union_kwargs(image=True)),
    "StableDiffusionXLControlNetUnionInpaintPipeline": zoo._case(
        lambda: _union("StableDiffusionXLControlNetUnionInpaintPipeline"),
        lambda: _union_kwargs(image=True, mask=True)),
    "StableDiffusionAdapterPipeline": zoo._case(lambda: _adapter("StableDiffusionAdapterPipeline", "sd"),
                                                lambda: _adapter_kwargs("sd")),
    "StableDiffusionXLAdapterPipeline": zoo._case(lambda: _adapter("StableDiffusionXLAdapterPipeline", "sdxl"),
                                                  lambda: _adapter_kwargs("sdxl")),
    "StableDiffusionControlNetXSPipeline": zoo._case(lambda: _xs("StableDiffusionControlNetXSPipeline", "sd"),
                                                     lambda: _xs_kwargs("sd")),
    "StableDiffusionXLControlNetXSPipeline": zoo._case(lambda: _xs("StableDiffusionXLControlNetXSPipeline", "sdxl"),
                                                       lambda: _xs_kwargs("sdxl")),
    "StableDiffusionImageVariationPipeline": zoo._case(
        lambda: _sd_variant("StableDiffusionImageVariationPipeline", image_encoder=_clip_vision()),
        lambda: {k: v for k, v in _sd_latent_kwargs(image=zoo._image(seed=243)).items()
                 if k not in ("prompt", "negative_prompt")}),
    "PaintByExamplePipeline": zoo._case(
        lambda: _sd_variant("PaintByExamplePipeline", unet=zoo._unet_variant("sd", 9),
                            image_encoder=_paint_by_example_encoder()),
        lambda: {k: v for k, v in _sd_latent_kwargs(image=zoo._image(), mask_image=zoo._mask(),
                                                     example_image=zoo._image(seed=244)).items()
                 if k not in ("prompt", "negative_prompt")}),
    "StableDiffusionUpscalePipeline": zoo._case(_upscale, _upscale_kwargs),
    # SAG installs an attention-storing processor on its UNet's mid block: its own UNet, not the shared one.
    "StableDiffusionSAGPipeline": zoo._case(
        lambda: _sd_variant("StableDiffusionSAGPipeline", unet=_unet_like("sd", 271)),
        lambda: _sd_latent_kwargs(sag_scale=0.0)),
    "StableDiffusionLDM3DPipeline": zoo._case(_ldm3d, lambda: {**zoo._sd_kwargs("sd"), "output_type": "np"}),
    "StableDiffusionGLIGENPipeline": zoo._case(lambda: _sd_variant("StableDiffusionGLIGENPipeline",
                                                                   unet=_gligen_unet()), _gligen_kwargs),
    "AltDiffusionPipeline": zoo._case(
        lambda: zoo._make("AltDiffusionPipeline", **_without(zoo._sd_parts(), "text_encoder", "tokenizer")),
        lambda: zoo._latent_call(height=32, width=32, guidance_scale=7.5, **zoo._text(32, 281))),
    "AltDiffusionImg2ImgPipeline": zoo._case(
        lambda: zoo._make("AltDiffusionImg2ImgPipeline", **_without(zoo._sd_parts(), "text_encoder", "tokenizer")),
        lambda: zoo._with_image(zoo._latent_call(guidance_scale=7.5, **zoo._text(32, 282)), image=True)),
    "KandinskyV22ControlnetPipeline": zoo._case(lambda: _kandinsky_controlnet("KandinskyV22ControlnetPipeline"),
                                                _kandinsky_controlnet_kwargs),
    "KandinskyV22ControlnetImg2ImgPipeline": zoo._case(
        lambda: _kandinsky_controlnet("KandinskyV22ControlnetImg2ImgPipeline"),
        lambda: _kandinsky_controlnet_kwargs(image=True)),
    "StableUnCLIPPipeline": zoo._case(_stable_unclip, lambda: _sd_latent_kwargs(noise_level=50,
                                                                              prior_num_inference_steps=2)),
    "StableUnCLIPImg2ImgPipeline": zoo._case(
        lambda: _unclip_make("StableUnCLIPImg2ImgPipeline", image_encoder=_clip_vision()),
        lambda: _sd_latent_kwargs(image=zoo._image(seed=303), noise_level=50)),
    "LDMTextToImagePipeline": zoo._case(  # latents are height // 8 whatever the VAE: 128 px -> 16x16
        _ldm_text_to_image, lambda: dict(prompt=zoo.tp.PROMPTS, height=128, width=128, guidance_scale=6.0,
                                         num_inference_steps=zoo.STEPS, output_type="pt")),
    "KandinskyPipeline": zoo._case(lambda: _kandinsky21("KandinskyPipeline"), _kandinsky21_kwargs),
    "KandinskyImg2ImgPipeline": zoo._case(lambda: _kandinsky21("KandinskyImg2ImgPipeline"),
                                          lambda: _kandinsky21_kwargs(image=True)),
    "KandinskyInpaintPipeline": zoo._case(lambda: _kandinsky21("KandinskyInpaintPipeline", in_channels=9),
                                          lambda: _kandinsky21_kwargs(image=True, mask=True)),
}
