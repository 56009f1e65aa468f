"""Tiny pipelines of the image family for tests/test_pipeline_zoo.py (rows in pipelines/adapters.py's image block).

Builders use pipeline_zoo's helpers (imported as `zoo`, used inside functions only: pipeline_zoo imports
this module at its end) and cache shared components with functools.cache.
"""

from __future__ import annotations

import copy
import functools

import torch

import diffusers
import pipeline_zoo as zoo  # noqa: F401  (helpers: zoo._make, zoo._new, zoo._text, zoo._latent_call, ...)


# --- Qwen-Image ControlNet variants (the Qwen-Image components plus a ControlNet) ------------------------
@functools.cache
def _qwen_controlnet() -> torch.nn.Module:
    return zoo._init(diffusers.QwenImageControlNetModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4)), 201)


@functools.cache
def _qwen_controlnet_inpaint() -> torch.nn.Module:
    # inpainting control: [control latents, mask] -> the ControlNet's extra conditioning channels
    return zoo._init(diffusers.QwenImageControlNetModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4), extra_condition_channels=4), 202)


def _qwen_controlnet_kwargs(mask: bool = False) -> dict:
    kw = {**zoo._qwen_kwargs(), "control_image": zoo._image(seed=201), "controlnet_conditioning_scale": 0.8}
    if mask:
        kw["control_mask"] = zoo._mask()
    return kw


# --- Qwen-Image edit variants: they resize every input image to ~1024 x 1024 pixels (calculate_dimensions), so
# a VAE with a factor of 64 (7 levels, no residual blocks) keeps the image tokens few (8 x 8) and the encoding short.
@functools.cache
def _qwen_edit_parts() -> dict:
    vae = zoo._new(lambda: diffusers.AutoencoderKLQwenImage(
        base_dim=2, z_dim=4, dim_mult=[1] * 7, num_res_blocks=0, temperal_downsample=[False] * 6,
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4), 205)
    return {**zoo._qwen_parts(), "vae": vae}


def _pil_images(n: int | None = None, seed: int = 206) -> list:
    import PIL.Image

    n = zoo.BATCH if n is None else n
    pixels = (zoo._image(32, seed=seed)[:1].repeat(n, 1, 1, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1)
    return [PIL.Image.fromarray(p.roll(i, 0).numpy()) for i, p in enumerate(pixels)]


def _qwen_edit_kwargs(batch: int | None = None, **extra) -> dict:
    kw, batch = zoo._qwen_kwargs(), zoo.BATCH if batch is None else batch
    kw.update({k: v[:batch] for k, v in kw.items() if torch.is_tensor(v)})
    return {**kw, "image": _pil_images(), "height": 128, "width": 128} | extra


# --- Chroma inpainting (packed token latents, two calls without a context) ------------------------------
@functools.cache
def _chroma_inpaint_parts() -> dict:
    # diffusers 0.42.1's ChromaInpaintPipeline reads transformer.config.guidance_embeds, a key that
    # ChromaTransformer2DModel's config lacks (AttributeError): a copy of the transformer with the key set (False).
    parts = dict(zoo._chroma_parts())
    parts["transformer"] = copy.deepcopy(parts["transformer"])
    parts["transformer"].register_to_config(guidance_embeds=False)
    return parts


def _chroma_inpaint_kwargs() -> dict:
    return {**zoo._chroma_kwargs(image=True), "mask_image": zoo._mask()}


# --- CogView4 Control (latents concatenated with the control latents on channels) -------------------------
@functools.cache
def _cogview4_control_parts() -> dict:
    parts = dict(zoo._cogview4_parts())
    parts["transformer"] = zoo._new(lambda: diffusers.CogView4Transformer2DModel(
        patch_size=2, in_channels=8, num_layers=2, attention_head_dim=4, num_attention_heads=4, out_channels=4,
        text_embed_dim=32, time_embed_dim=8, condition_dim=4), 211)
    return parts


# --- Sana ControlNet ---------------------------------------------------------------------------------------
@functools.cache
def _sana_controlnet() -> torch.nn.Module:
    return zoo._init(diffusers.SanaControlNetModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=32), 221)


# --- HunyuanDiT ControlNet -------------------------------------------------------------------------------
@functools.cache
def _hunyuandit_controlnet() -> torch.nn.Module:
    return zoo._init(diffusers.HunyuanDiT2DControlNetModel(
        sample_size=16, transformer_num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        in_channels=4, cross_attention_dim=32, cross_attention_dim_t5=32, pooled_projection_dim=16, hidden_size=24,
        activation_fn="gelu-approximate"), 231)


@functools.cache
def _vae_f8() -> torch.nn.Module:
    """A tiny AutoencoderKL with the usual factor 8 (HunyuanDiT's rotary grid assumes it)."""
    return zoo._new(lambda: diffusers.AutoencoderKL(
        block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=4, norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4), 232)


# --- SD3 ControlNet inpainting (control image + mask into the ControlNet) ----------------------------------
@functools.cache
def _sd3_controlnet_inpaint() -> torch.nn.Module:
    return zoo._init(diffusers.SD3ControlNetModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=32, extra_conditioning_channels=1), 241)


# --- CogView3-Plus (batched [uncond; cond]) ----------------------------------------------------------------
@functools.cache
def _cogview3plus_parts() -> dict:
    transformer = zoo._new(lambda: diffusers.CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=1, attention_head_dim=4, num_attention_heads=2, out_channels=4,
        text_embed_dim=32, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8, sample_size=8), 251)
    return dict(transformer=transformer, vae=zoo._sd_parts()["vae"], scheduler=diffusers.CogVideoXDDIMScheduler())


# --- Flux.2 Klein (packed token latents; cond / uncond in cache_context) ----------------------------------
@functools.cache
def _flux2_parts() -> dict:
    transformer = zoo._new(lambda: diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False), 261)
    vae = zoo._new(lambda: diffusers.AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False), 262)
    return dict(transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def _flux2_kwargs(**extra) -> dict:
    return zoo._latent_call(height=32, width=32, guidance_scale=4.0, **zoo._text(16, 263), **extra)


# --- Ovis-Image (packed token latents; cache_context) -----------------------------------------------------
@functools.cache
def _ovis_parts() -> dict:
    transformer = zoo._new(lambda: diffusers.OvisImageTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8)), 271)
    vae = zoo._new(lambda: diffusers.AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=1.5035), 272)
    return dict(transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


# --- NucleusMoE-Image (Qwen-Image-like; two calls without a context; negated velocity) ------------------------
@functools.cache
def _nucleusmoe_parts() -> dict:
    transformer = zoo._new(lambda: diffusers.NucleusMoEImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4), moe_enabled=False, capacity_factors=[8.0, 8.0]), 281)
    return {**zoo._qwen_parts(), "transformer": transformer}


# --- Bria (batched [uncond; cond]; packed token latents) ----------------------------------------------------
@functools.cache
def _bria_parts() -> dict:
    transformer = zoo._new(lambda: diffusers.BriaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4]), 291)
    vae = zoo._new(lambda: diffusers.AutoencoderKL(
        block_out_channels=(4,), layers_per_block=1, latent_channels=4, norm_num_groups=1, shift_factor=0.0,
        use_quant_conv=False, use_post_quant_conv=False), 292)
    return dict(transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


# --- PRX (batched [uncond; cond]) ---------------------------------------------------------------------------
@functools.cache
def _prx_parts() -> dict:
    transformer = zoo._new(lambda: diffusers.PRXTransformer2DModel(
        patch_size=1, in_channels=4, context_in_dim=8, hidden_size=8, mlp_ratio=2.0, num_heads=2, depth=1,
        axes_dim=[2, 2]), 301)
    return dict(transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def _prx_kwargs() -> dict:
    # One prompt: diffusers 0.42.1's PRXPipeline builds its CFG timestep as .repeat(2) (2 rows, not 2 x batch),
    # so its own CFG fails on a batch of 2 prompts.
    text = {k: v[:1] for k, v in zoo._text(8, 303, mask="prompt_attention_mask").items()}
    return zoo._latent_call(height=32, width=32, guidance_scale=4.0, use_resolution_binning=False, **text)


# --- ERNIE-Image (batched [uncond; cond]; prompt embeddings as a list of per-prompt tensors) --------------------
@functools.cache
def _ernie_parts() -> dict:
    # _init, not _new: its zero-initialised output layer would make every prediction 0
    transformer = zoo._init(diffusers.ErnieImageTransformer2DModel(
        hidden_size=32, num_attention_heads=2, num_layers=1, ffn_hidden_size=32, in_channels=4, out_channels=4,
        patch_size=1, text_in_dim=16, rope_axes_dim=(4, 6, 6)), 311)
    return dict(transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def _ernie_kwargs() -> dict:
    text = zoo._text(16, 313)
    return zoo._latent_call(height=32, width=32, guidance_scale=4.0, use_pe=False,
                            prompt_embeds=list(text["prompt_embeds"]),
                            negative_prompt_embeds=list(text["negative_prompt_embeds"][:, :5]))


# --- Bria FIBO (batched [uncond; cond]; every text-encoder layer feeds a block): no prompt-embedding input, so a
# tiny SmolLM3 with the offline T5-style tokenizer (diffusers' own FIBO test pairs SmolLM3 with a T5 tokenizer).
@functools.cache
def _fibo_parts() -> dict:
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    transformer = zoo._new(lambda: diffusers.BriaFiboTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=64, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4], text_encoder_dim=32), 321)
    # vocab past 128000: the pipeline encodes an empty prompt as token 128000
    config = SmolLM3Config(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=128256)
    text_encoder = zoo._new(lambda: SmolLM3ForCausalLM(config), 322)
    return dict(transformer=transformer, text_encoder=text_encoder, tokenizer=zoo.tp.t5_tokenizer(),
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


@functools.cache
def _fibo_edit_parts() -> dict:
    vae = zoo._new(lambda: diffusers.AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1, in_channels=12, out_channels=12,
        is_residual=True, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4, z_dim=16,
        temperal_downsample=[False, True, True], latents_mean=[0.0] * 16, latents_std=[1.0] * 16), 323)
    return {**_fibo_parts(), "vae": vae}


def _fibo_kwargs(**extra) -> dict:
    return zoo._latent_call(prompt=zoo.tp.PROMPTS, negative_prompt=zoo.tp.NEGATIVE_PROMPTS, height=32, width=32,
                            guidance_scale=4.0, **extra)


# --- LongCat-Image (packed token latents; cache_context): its prompt-embedding path is broken in diffusers 0.42.1
# (encode_prompt takes len(prompt) even when prompt is None, and re-encodes the negative prompt "" at batch 1), so
# the prompts go through a tiny Qwen2.5-VL text model with the offline T5-style tokenizer.
@functools.cache
def _longcat_parts() -> dict:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = zoo.tp.t5_tokenizer()
    transformer = zoo._new(lambda: diffusers.LongCatImageTransformer2DModel(  # 16 latent channels, packed 2 x 2
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=[4, 6, 6]), 331)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer),
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16, vocab_size=len(tokenizer))
    text_encoder = zoo._new(lambda: Qwen2_5_VLForConditionalGeneration(config), 332)
    return dict(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


# --- GLM-Image (two calls without a context; the prior image tokens of its AR model passed in) --------------------
@functools.cache
def _glm_parts() -> dict:
    transformer = zoo._new(lambda: diffusers.GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=128), 351)
    return dict(transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def _glm_kwargs() -> dict:
    prior = torch.randint(0, 128, (zoo.BATCH, 4), generator=torch.Generator().manual_seed(352))  # 2 x 2 tokens
    return zoo._latent_call(height=32, width=32, guidance_scale=4.0, prior_token_ids=prior, **zoo._text(32, 353))


# --- LongCat-Image-Edit: one prompt per call (its _encode_prompt reads prompt[0] only), the condition image through
# a tiny Qwen2.5-VL (vision tower included) with the T5-style tokenizer plus the chat template's special tokens, and
# the image resized to ~1024 x 1024 (calculate_dimensions) into a VAE with a factor of 64.
class _VLProcessorStub:
    """The one thing LongCatImageEditPipeline takes from its Qwen2-VL processor: the image processor."""

    def __init__(self, image_processor):
        self.image_processor = image_processor


@functools.cache
def _longcat_edit_parts() -> dict:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    tokenizer = zoo.tp.t5_tokenizer()
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer),
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16, vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"))
    text_encoder = zoo._new(lambda: Qwen2_5_VLForConditionalGeneration(config), 361)
    vae = zoo._new(lambda: diffusers.AutoencoderKL(
        block_out_channels=(2,) * 7, layers_per_block=1, latent_channels=16, norm_num_groups=1, shift_factor=0.0,
        down_block_types=("DownEncoderBlock2D",) * 7, up_block_types=("UpDecoderBlock2D",) * 7), 362)
    processor = _VLProcessorStub(Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56))
    return dict(_longcat_parts(), text_encoder=text_encoder, tokenizer=tokenizer, vae=vae, text_processor=processor)


CASES: dict = {
    "QwenImageControlNetPipeline": zoo._case(
        lambda: zoo._make("QwenImageControlNetPipeline", **zoo._qwen_parts(), controlnet=_qwen_controlnet()),
        _qwen_controlnet_kwargs),
    "QwenImageControlNetInpaintPipeline": zoo._case(
        lambda: zoo._make("QwenImageControlNetInpaintPipeline", **zoo._qwen_parts(),
                          controlnet=_qwen_controlnet_inpaint()),
        lambda: _qwen_controlnet_kwargs(mask=True)),
    "ChromaInpaintPipeline": zoo._case(lambda: zoo._finish(diffusers.ChromaInpaintPipeline(**_chroma_inpaint_parts())),
                                       _chroma_inpaint_kwargs),
    "CogView4ControlPipeline": zoo._case(lambda: zoo._make("CogView4ControlPipeline", **_cogview4_control_parts()),
                                         lambda: {**zoo._cogview4_kwargs(), "control_image": zoo._image(seed=212)}),
    "SanaControlNetPipeline": zoo._case(
        lambda: zoo._make("SanaControlNetPipeline", **zoo._sana_parts(), controlnet=_sana_controlnet()),
        lambda: {**zoo._sana_kwargs(), "control_image": zoo._image(seed=222)}),
    "HunyuanDiTControlNetPipeline": zoo._case(
        lambda: zoo._make("HunyuanDiTControlNetPipeline", **zoo._hunyuandit_parts(), vae=_vae_f8(),
                          controlnet=_hunyuandit_controlnet()),
        lambda: {**zoo._hunyuandit_kwargs(), "control_image": zoo._image(seed=232)}),
    "StableDiffusion3ControlNetInpaintingPipeline": zoo._case(
        lambda: zoo._make("StableDiffusion3ControlNetInpaintingPipeline", **zoo._sd3_parts(),
                          controlnet=_sd3_controlnet_inpaint()),
        lambda: {**zoo._sd3_kwargs(), "control_image": zoo._image(seed=242), "control_mask": zoo._mask()}),
    "CogView3PlusPipeline": zoo._case(lambda: zoo._make("CogView3PlusPipeline", **_cogview3plus_parts()),
                                      lambda: zoo._latent_call(height=32, width=32, guidance_scale=4.0,
                                                               **zoo._text(32, 253))),
    "Flux2KleinPipeline": zoo._case(lambda: zoo._make("Flux2KleinPipeline", **_flux2_parts()), _flux2_kwargs),
    "Flux2KleinInpaintPipeline": zoo._case(
        lambda: zoo._make("Flux2KleinInpaintPipeline", **_flux2_parts()),
        lambda: _flux2_kwargs(image=zoo._image(seed=264), mask_image=zoo._mask(), strength=0.75)
        | {"num_inference_steps": 4}),
    "OvisImagePipeline": zoo._case(lambda: zoo._make("OvisImagePipeline", **_ovis_parts()),
                                   lambda: zoo._latent_call(height=32, width=32, guidance_scale=4.0,
                                                            negative_prompt=None, **zoo._text(32, 273))),
    "NucleusMoEImagePipeline": zoo._case(
        lambda: zoo._make("NucleusMoEImagePipeline", **_nucleusmoe_parts()),
        lambda: zoo._latent_call(height=32, width=32, guidance_scale=4.0,
                                 **zoo._text(16, 283, mask="prompt_embeds_mask"))),
    "BriaPipeline": zoo._case(lambda: zoo._make("BriaPipeline", **_bria_parts()),
                              lambda: zoo._latent_call(height=32, width=32, guidance_scale=4.0, **zoo._text(32, 293))),
    "PRXPipeline": zoo._case(lambda: zoo._make("PRXPipeline", **_prx_parts()), _prx_kwargs),
    "ErnieImagePipeline": zoo._case(lambda: zoo._make("ErnieImagePipeline", **_ernie_parts()), _ernie_kwargs),
    "QwenImageEditPipeline": zoo._case(lambda: zoo._make("QwenImageEditPipeline", **_qwen_edit_parts()),
                                       _qwen_edit_kwargs),
    # Edit Plus takes one prompt (batch_size > 1 is refused) and several condition images: two images per prompt.
    "QwenImageEditPlusPipeline": zoo._case(
        lambda: zoo._make("QwenImageEditPlusPipeline", **_qwen_edit_parts()),
        lambda: _qwen_edit_kwargs(batch=1, num_images_per_prompt=2, image=_pil_images(1))),
    "QwenImageEditInpaintPipeline": zoo._case(
        lambda: zoo._make("QwenImageEditInpaintPipeline", **_qwen_edit_parts()),
        lambda: _qwen_edit_kwargs(mask_image=zoo._mask(128), strength=0.75, num_inference_steps=4)),
    "BriaFiboPipeline": zoo._case(lambda: zoo._make("BriaFiboPipeline", **_fibo_parts()), _fibo_kwargs),
    # one reference image for both prompts (a list of images is several references, not a batch); JSON prompts
    # with the edit instruction its check requires
    "BriaFiboEditPipeline": zoo._case(
        lambda: zoo._make("BriaFiboEditPipeline", **_fibo_edit_parts()),
        lambda: _fibo_kwargs(image=_pil_images(1)[0]) | {"prompt": [
            '{"text": "%s", "edit_instruction": "%s"}' % (p, p) for p in zoo.tp.PROMPTS]}),
    "LongCatImagePipeline": zoo._case(
        lambda: zoo._make("LongCatImagePipeline", **_longcat_parts()),
        lambda: zoo._latent_call(prompt=zoo.tp.PROMPTS, negative_prompt=zoo.tp.NEGATIVE_PROMPTS, height=32, width=32,
                                 guidance_scale=4.0, enable_prompt_rewrite=False)),
    "GlmImagePipeline": zoo._case(lambda: zoo._make("GlmImagePipeline", **_glm_parts()), _glm_kwargs),
    "LongCatImageEditPipeline": zoo._case(
        lambda: zoo._make("LongCatImageEditPipeline", **_longcat_edit_parts()),
        lambda: zoo._latent_call(prompt=zoo.tp.PROMPTS[0], negative_prompt=zoo.tp.NEGATIVE_PROMPTS[0],
                                 image=_pil_images(1)[0], guidance_scale=4.0, num_images_per_prompt=2)),
}


# --- Z-Image (one [cond; uncond] call on per-sample lists: latents as [C, 1, H, W] tensors, caption features of
# different lengths; the transformer returns a list). Caption lengths cross the transformer's 32-token padding
# blocks, so rows differ in length and the batch carries attention masks.
@functools.cache
def _z_image_parts() -> dict:
    transformer = zoo._init(diffusers.ZImageTransformer2DModel(  # _init: its pad tokens start as torch.empty
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32]), 381)
    vae = zoo._new(lambda: diffusers.AutoencoderKL(  # factor 8, 4 latent channels; img2img reads its shift_factor
        block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=4, norm_num_groups=2, shift_factor=0.1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4), 382)
    return dict(transformer=transformer, vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


@functools.cache
def _z_image_controlnet(control_in_dim: int) -> torch.nn.Module:
    # the pipeline shares the transformer's embedders and refiners with it (from_transformer)
    return zoo._init(diffusers.ZImageControlNetModel(
        control_layers_places=[0], control_refiner_layers_places=[0], control_in_dim=control_in_dim, dim=32,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2), 383 + control_in_dim)


def _z_image_kwargs(**extra) -> dict:
    g = torch.Generator().manual_seed(384)
    cond, uncond = [torch.randn(n, 16, generator=g) for n in (40, 8)], [torch.randn(n, 16, generator=g) for n in (5, 3)]
    return {**zoo._latent_call(prompt_embeds=cond, negative_prompt_embeds=uncond, guidance_scale=4.0, height=32,
                               width=32), **extra}


def _z_image_case(name: str, control_in_dim: int | None = None, inputs=dict) -> tuple:
    """`inputs`: a function giving the call's image inputs (built when the case runs)."""
    def build():
        parts = dict(_z_image_parts())
        if control_in_dim is not None:
            parts["controlnet"] = _z_image_controlnet(control_in_dim)
        return zoo._make(name, **parts)

    return zoo._case(build, lambda: _z_image_kwargs(**inputs()))


def _z_image_init(mask: bool = False) -> dict:
    """The image to start from (strength 0.75 of 4 steps: 3 run) and, for inpainting, its mask."""
    kw = dict(image=zoo._image(), strength=0.75, num_inference_steps=4)
    return {**kw, "mask_image": zoo._mask()} if mask else kw


CASES.update({
    "ZImagePipeline": _z_image_case("ZImagePipeline"),
    "ZImageImg2ImgPipeline": _z_image_case("ZImageImg2ImgPipeline", inputs=_z_image_init),
    "ZImageInpaintPipeline": _z_image_case("ZImageInpaintPipeline", inputs=lambda: _z_image_init(mask=True)),
    "ZImageControlNetPipeline": _z_image_case("ZImageControlNetPipeline", 4,
                                              lambda: dict(control_image=zoo._image(seed=385))),
    # control input: [control latents, mask, masked-image latents] = 2 x 4 + 1 channels; no strength: every step runs
    "ZImageControlNetInpaintPipeline": _z_image_case(
        "ZImageControlNetInpaintPipeline", 9,
        lambda: dict(control_image=zoo._image(seed=385), image=zoo._image(), mask_image=zoo._mask())),
})
