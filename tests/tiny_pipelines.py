"""Tiny, random-init, deterministic diffusers pipelines for CPU tests.

Every pipeline is built from configs only (no Hugging Face Hub access; ``HF_HUB_OFFLINE=1`` is set before
``transformers``/``diffusers`` are imported, unless the caller already set it or imported them first).  All
weights are float32 on CPU and seeded inside :func:`build` (the caller's global torch RNG state is left untouched),
so two builds with the same ``seed`` are bit-identical.

Usage::

    import torch
    from tiny_pipelines import build, call_kwargs

    pipe = build("sd")
    images = pipe(**call_kwargs("sd"), generator=torch.Generator().manual_seed(0)).images  # (2, 3, 32, 32)

Pipelines (``PIPELINE_NAMES``) and the call kwarg that turns the pipeline's own classifier-free guidance (CFG) on:

============== ========================== ==================================== ================================
name           pipeline                   CFG on when                          CFG batch layout of the denoiser
============== ========================== ==================================== ================================
sd             StableDiffusionPipeline    ``guidance_scale > 1``               one call, ``[uncond; cond]``
sdxl           StableDiffusionXLPipeline  ``guidance_scale > 1``               one call, ``[uncond; cond]``
sd3            StableDiffusion3Pipeline   ``guidance_scale > 1``               one call, ``[uncond; cond]``
pixart_alpha   PixArtAlphaPipeline        ``guidance_scale > 1``               one call, ``[uncond; cond]``
pixart_sigma   PixArtSigmaPipeline        ``guidance_scale > 1``               one call, ``[uncond; cond]``
dit            DiTPipeline                ``guidance_scale > 1``               one call, ``[cond; uncond]``
flux           FluxPipeline               ``true_cfg_scale > 1`` **and** a     two sequential calls, cond first
                                          ``negative_prompt`` (or negative     (``cache_context("cond")``) then
                                          embeds) is given                     uncond (``cache_context("uncond")``)
============== ========================== ==================================== ================================

(``CFG_KWARG`` / ``CFG_LAYOUT`` hold the same information.)  The tiny Flux transformer has
``guidance_embeds=True`` (FLUX.1-dev-like), so Flux's ``guidance_scale`` is the *distilled* guidance embedding, not
CFG; :func:`call_kwargs` keeps it fixed at 3.5 whether CFG is on or off.

Pipeline quirks worth knowing when hooking the denoiser (diffusers 0.42.1):

* Only Flux wraps its denoiser calls in ``transformer.cache_context("cond")`` / ``("uncond")`` (name only,
  ``step_index`` etc. left ``None``).  The other six pipelines set no cache context, so a stateful diffusers hook
  that reads ``StateManager.context`` raises there unless something else sets one.
* Default unconditional branch: SD, SD3 and PixArt encode ``""`` when no negative prompt is given; SDXL uses
  all-zero embeddings (``force_zeros_for_empty_prompt=True``); DiT uses the null class id 1000; Flux runs no CFG
  at all without a negative prompt.
* DiT is class-conditional: no ``negative_prompt``, no ``num_images_per_prompt``, no ``height``/``width`` (size fixed
  by ``transformer.config.sample_size``).  It does not pass ``generator`` to ``scheduler.step`` (stochastic
  schedulers such as DDPM / Euler-ancestral draw from the global torch RNG: seed it for reproducibility) and does not
  scale the initial noise by ``scheduler.init_noise_sigma`` (Euler-type schedulers run but are not meaningful).
* DiT and PixArt denoisers output ``2 * latent_channels`` channels (learned sigma); the pipelines guide the whole
  output and then keep the first half (DiT guides only the eps half).
* Negative prompts: SD raises ``TypeError`` if ``negative_prompt`` is a str while ``prompt`` is a list (SDXL, SD3,
  PixArt and Flux accept a str).  Flux does not repeat a str negative prompt to the batch: its uncond call then gets
  ``encoder_hidden_states`` / ``pooled_projections`` of batch 1 next to latents of batch 2 (the transformer
  broadcasts).  :func:`call_kwargs` therefore always passes one negative prompt per prompt.

Shapes: every :func:`call_kwargs` default asks for ``output_type="pt"`` (all seven pipelines support it), so
``.images`` is a float tensor ``(batch * num_images_per_prompt, 3, H, W)`` in ``[0, 1]``; see ``IMAGE_SIZE``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import functools
import gzip
import importlib.resources
from typing import Any

import torch

import diffusers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

__all__ = [
    "PIPELINE_NAMES",
    "VP_PIPELINES",
    "FLOW_PIPELINES",
    "VP_SCHEDULERS",
    "CFG_KWARG",
    "CFG_LAYOUT",
    "DENOISER_ATTR",
    "IMAGE_SIZE",
    "SUPPORTS_NEGATIVE_PROMPT",
    "SUPPORTS_NUM_IMAGES_PER_PROMPT",
    "build",
    "build_sd",
    "call_kwargs",
    "denoiser",
    "clip_tokenizer",
    "t5_tokenizer",
]

PIPELINE_NAMES: tuple[str, ...] = ("sd", "sdxl", "sd3", "pixart_alpha", "pixart_sigma", "dit", "flux")

#: DDPM-style (VP, epsilon / v-prediction) pipelines: their scheduler can be swapped among ``VP_SCHEDULERS``.
VP_PIPELINES: tuple[str, ...] = ("sd", "sdxl", "pixart_alpha", "pixart_sigma", "dit")
#: Rectified-flow pipelines: only ``FlowMatch*`` schedulers make sense (the pipelines pass ``sigmas``/``mu``).
FLOW_PIPELINES: tuple[str, ...] = ("sd3", "flux")

VP_SCHEDULERS: tuple[str, ...] = (
    "DDIMScheduler",
    "DDPMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
)

#: The ``__call__`` kwarg that switches each pipeline's own CFG on (it is on when the value is > 1).
CFG_KWARG: dict[str, str] = {
    "sd": "guidance_scale",
    "sdxl": "guidance_scale",
    "sd3": "guidance_scale",
    "pixart_alpha": "guidance_scale",
    "pixart_sigma": "guidance_scale",
    "dit": "guidance_scale",
    "flux": "true_cfg_scale",  # and it also needs negative_prompt (or negative_prompt_embeds + pooled)
}

#: How each pipeline lays out the CFG batch for the denoiser.
#: "uncond_cond": one call on ``cat([uncond, cond])``; "cond_uncond": one call on ``cat([cond, uncond])``;
#: "sequential": two calls per step, cond first then uncond (Flux, each wrapped in ``transformer.cache_context``).
CFG_LAYOUT: dict[str, str] = {
    "sd": "uncond_cond",
    "sdxl": "uncond_cond",
    "sd3": "uncond_cond",
    "pixart_alpha": "uncond_cond",
    "pixart_sigma": "uncond_cond",
    "dit": "cond_uncond",
    "flux": "sequential",
}

#: Attribute of the pipeline holding the denoiser (where a guidance ModelHook goes).
DENOISER_ATTR: dict[str, str] = {name: ("unet" if name in ("sd", "sdxl") else "transformer") for name in PIPELINE_NAMES}

#: Output image side (pixels) of the default :func:`call_kwargs`.  DiT's size is fixed by the transformer.
IMAGE_SIZE: dict[str, int] = {name: 32 for name in PIPELINE_NAMES}

#: DiT is class-conditional: no prompts, so no negative prompt and no ``num_images_per_prompt``.
SUPPORTS_NEGATIVE_PROMPT: dict[str, bool] = {name: name != "dit" for name in PIPELINE_NAMES}
SUPPORTS_NUM_IMAGES_PER_PROMPT: dict[str, bool] = {name: name != "dit" for name in PIPELINE_NAMES}

PROMPTS = ["a photo of a cat", "a red car on a street"]
NEGATIVE_PROMPTS = ["blurry, low quality", "a drawing"]
CLASS_LABELS = [207, 360]

# Per-pipeline "CFG on" scale (the pipelines' usual defaults).
_CFG_ON_SCALE = {"sd": 7.5, "sdxl": 5.0, "sd3": 7.0, "pixart_alpha": 4.5, "pixart_sigma": 4.5, "dit": 4.0, "flux": 4.0}
_FLUX_DISTILLED_GUIDANCE = 3.5
_T5_MAX_SEQUENCE_LENGTH = 16  # passed as max_sequence_length to the T5 pipelines to keep them fast

# Number of BPE merges kept from the real CLIP vocab (the full vocab has 48894 merges).
_CLIP_NUM_MERGES = 4000


# --------------------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode char table (same as open_clip / transformers)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@functools.lru_cache(maxsize=None)
def _clip_vocab_and_merges(num_merges: int = _CLIP_NUM_MERGES) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """The real CLIP BPE vocab (from the open_clip wheel), truncated to the first ``num_merges`` merges.

    Same id layout as ``openai/clip-vit-*``: 256 byte tokens, 256 byte tokens + ``</w>``, one token per merge, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (so with the full vocab these are 49406 / 49407).
    """
    path = importlib.resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    with path.open("rb") as fh:
        lines = gzip.decompress(fh.read()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 1 + num_merges])
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77) -> CLIPTokenizer:
    """A real-vocab (truncated) CLIP BPE tokenizer built offline. ``len(tok)`` covers every id it produces."""
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=[tuple(m) for m in merges], pad_token=pad_token, model_max_length=model_max_length
    )


@functools.lru_cache(maxsize=None)
def _t5_vocab() -> tuple[tuple[str, float], ...]:
    """A small Unigram vocab: T5 specials (<pad>=0, </s>=1, <unk>=2), chars, and whole words from the CLIP vocab."""
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"]
    chars = [chr(c) for c in range(33, 127)]
    pieces += chars + ["\u2581" + c for c in chars]
    clip_vocab, _ = _clip_vocab_and_merges()
    words = [t[: -len("</w>")] for t in clip_vocab if t.endswith("</w>") and t[:-4].isalpha() and len(t) > 5]
    pieces += ["\u2581" + w for w in words]
    seen: set[str] = set()
    vocab = []
    for p in pieces:
        if p not in seen:
            seen.add(p)
            vocab.append((p, 0.0 if p in ("<pad>", "</s>", "<unk>") else -1.0))  # equal scores: fewest pieces wins
    return tuple(vocab)


def t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """An offline T5-style (Unigram, ``</s>`` appended, ``<pad>`` = 0) tokenizer; ``T5TokenizerFast`` in v5 is this."""
    return T5Tokenizer(vocab=list(_t5_vocab()), extra_ids=0, model_max_length=model_max_length)


# --------------------------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------------------------
def _clip_text(tokenizer: CLIPTokenizer, *, hidden: int = 32, projection_dim: int | None = None) -> torch.nn.Module:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection_dim or hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModel if projection_dim is None else CLIPTextModelWithProjection
    return cls(config)


def _t5_encoder(tokenizer: T5Tokenizer, *, d_model: int = 32) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",  # T5 v1.1 / T5-XXL style
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        is_encoder_decoder=False,
    )
    return T5EncoderModel(config)


def _vae(latent_channels: int = 4, **kwargs: Any) -> AutoencoderKL:
    """Two-level AutoencoderKL: vae_scale_factor 2 (32x32 image <-> 16x16 latent)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        **kwargs,
    )


def _seed(seed: int, component: int) -> None:
    """Seed the global torch RNG for one component (weights depend only on (seed, pipeline, component))."""
    torch.manual_seed(seed * 1000 + _current_offset[0] + component)


_current_offset = [0]  # per-pipeline offset (so e.g. pixart_alpha and pixart_sigma get different weights)


def _sd_like_scheduler_config(prediction_type: str) -> dict[str, Any]:
    """Stable Diffusion 1.x / XL training schedule."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        steps_offset=1,
        timestep_spacing="leading",
    )


def _build_sd(prediction_type: str, seed: int) -> StableDiffusionPipeline:
    _seed(seed, 1)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    _seed(seed, 2)
    vae = _vae()
    tokenizer = clip_tokenizer()
    _seed(seed, 3)
    text_encoder = _clip_text(tokenizer, hidden=32)
    scheduler = DDIMScheduler(
        **_sd_like_scheduler_config(prediction_type), clip_sample=False, set_alpha_to_one=False
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(prediction_type: str, seed: int) -> StableDiffusionXLPipeline:
    addition_time_embed_dim = 8
    projection_dim = 32
    _seed(seed, 1)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        # 6 micro-conditioning ids (orig size, crop, target size) + pooled text_encoder_2 projection
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + projection_dim,
        cross_attention_dim=32 + 32,  # concat of both text encoders' penultimate hidden states
        norm_num_groups=4,
    )
    _seed(seed, 2)
    vae = _vae()
    tokenizer = clip_tokenizer()
    tokenizer_2 = clip_tokenizer(pad_token="!")  # as in SDXL's tokenizer_2 (open_clip ViT-bigG pads with "!")
    _seed(seed, 3)
    text_encoder = _clip_text(tokenizer, hidden=32)
    _seed(seed, 4)
    text_encoder_2 = _clip_text(tokenizer_2, hidden=32, projection_dim=projection_dim)
    scheduler = EulerDiscreteScheduler(**_sd_like_scheduler_config(prediction_type), interpolation_type="linear")
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _build_sd3(seed: int) -> StableDiffusion3Pipeline:
    clip_hidden, clip_proj, t5_dim = 32, 32, 64
    _seed(seed, 1)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_dim,  # CLIP-L ++ CLIP-G hidden states are zero-padded up to the T5 width
        caption_projection_dim=32,
        pooled_projection_dim=2 * clip_proj,
        pos_embed_max_size=32,
    )
    _seed(seed, 2)
    vae = _vae(shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False)
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(pad_token="!"), t5_tokenizer()
    _seed(seed, 3)
    text_encoder = _clip_text(tokenizer, hidden=clip_hidden, projection_dim=clip_proj)
    _seed(seed, 4)
    text_encoder_2 = _clip_text(tokenizer_2, hidden=clip_hidden, projection_dim=clip_proj)
    _seed(seed, 5)
    text_encoder_3 = _t5_encoder(tokenizer_3, d_model=t5_dim)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _pixart_scheduler(prediction_type: str) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type=prediction_type,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        timestep_spacing="linspace",
        steps_offset=0,
    )


def _build_pixart(cls: type, prediction_type: str, seed: int):
    t5_dim = 32
    _seed(seed, 1)
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=8,  # learned sigma, as the real PixArt checkpoints
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        cross_attention_dim=32,
        caption_channels=t5_dim,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    _seed(seed, 2)
    vae = _vae()
    tokenizer = t5_tokenizer()
    _seed(seed, 3)
    text_encoder = _t5_encoder(tokenizer, d_model=t5_dim)
    return cls(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=_pixart_scheduler(prediction_type),
    )


def _build_dit(prediction_type: str, seed: int) -> DiTPipeline:
    _seed(seed, 1)
    transformer = DiTTransformer2DModel(
        sample_size=16,  # fixed latent size -> 32x32 images (DiTPipeline has no height/width)
        patch_size=2,
        in_channels=4,
        out_channels=8,  # learned sigma, as the real DiT
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        num_embeds_ada_norm=1000,  # ImageNet classes; the pipeline's null class is id 1000
        norm_num_groups=4,
    )
    _seed(seed, 2)
    vae = _vae()
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type=prediction_type,
        clip_sample=False,
    )
    id2label = {i: f"class {i}" for i in range(1000)}
    id2label[207], id2label[360] = "golden retriever", "otter"
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)


def _build_flux(seed: int) -> FluxPipeline:
    latent_channels, clip_hidden, t5_dim = 4, 32, 32
    _seed(seed, 1)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # the pipeline packs 2x2 latent patches into tokens
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_dim,
        pooled_projection_dim=clip_hidden,  # CLIPTextModel pooler_output
        guidance_embeds=True,  # FLUX.1-dev-like: guidance_scale is a distilled-guidance embedding, not CFG
        axes_dims_rope=(4, 6, 6),
    )
    _seed(seed, 2)
    vae = _vae(
        latent_channels=latent_channels,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    _seed(seed, 3)
    text_encoder = _clip_text(tokenizer, hidden=clip_hidden)
    _seed(seed, 4)
    text_encoder_2 = _t5_encoder(tokenizer_2, d_model=t5_dim)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _resolve_scheduler(name: str, scheduler: str | type) -> type:
    cls = getattr(diffusers, scheduler) if isinstance(scheduler, str) else scheduler
    is_flow = cls.__name__.startswith("FlowMatch")
    if name in FLOW_PIPELINES and not is_flow:
        raise ValueError(f"{name!r} is a rectified-flow pipeline; use a FlowMatch* scheduler, not {cls.__name__}")
    if name in VP_PIPELINES and is_flow:
        raise ValueError(f"{name!r} is a VP (DDPM-style) pipeline; {cls.__name__} does not fit it")
    return cls


# --------------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------------
def build(
    name: str,
    scheduler: str | type | None = None,
    *,
    prediction_type: str | None = None,
    scheduler_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
):
    """Build the tiny pipeline ``name`` (one of ``PIPELINE_NAMES``): float32, CPU, eval mode, progress bar off.

    Args:
        name: "sd", "sdxl", "sd3", "pixart_alpha", "pixart_sigma", "dit" or "flux".
        scheduler: optional scheduler class (or its name in ``diffusers``) to swap in via
            ``SchedulerClass.from_config(pipe.scheduler.config)``.  VP pipelines take e.g. ``VP_SCHEDULERS``;
            "sd3"/"flux" only take ``FlowMatch*`` schedulers.
        prediction_type: "epsilon" (default) or "v_prediction" (or "sample") for the VP pipelines' scheduler
            config.  Not accepted for "sd3"/"flux" (flow matching).
        scheduler_kwargs: extra scheduler config overrides (e.g. ``{"rescale_betas_zero_snr": True}``).
        seed: weight seed; weights depend only on (name, seed).  The caller's global RNG state is restored.

    Default schedulers: sd DDIM, sdxl EulerDiscrete (both SD scaled_linear betas, "leading" spacing,
    steps_offset=1), pixart_* DPMSolverMultistep (dpmsolver++, linear betas), dit DDIM (linear betas),
    sd3 FlowMatchEulerDiscrete (shift=3), flux FlowMatchEulerDiscrete (dynamic shifting).
    """
    if name not in PIPELINE_NAMES:
        raise ValueError(f"unknown tiny pipeline {name!r}; expected one of {PIPELINE_NAMES}")
    if prediction_type is not None and name in FLOW_PIPELINES:
        raise ValueError(f"{name!r} is a flow-matching pipeline; prediction_type does not apply")
    ptype = prediction_type or "epsilon"

    _current_offset[0] = 10 * PIPELINE_NAMES.index(name)
    with torch.random.fork_rng(devices=[]):  # seeds the weights without disturbing the caller's RNG
        if name == "sd":
            pipe = _build_sd(ptype, seed)
        elif name == "sdxl":
            pipe = _build_sdxl(ptype, seed)
        elif name == "sd3":
            pipe = _build_sd3(seed)
        elif name == "pixart_alpha":
            pipe = _build_pixart(PixArtAlphaPipeline, ptype, seed)
        elif name == "pixart_sigma":
            pipe = _build_pixart(PixArtSigmaPipeline, ptype, seed)
        elif name == "dit":
            pipe = _build_dit(ptype, seed)
        else:
            pipe = _build_flux(seed)

    if scheduler is not None or scheduler_kwargs:
        cls = _resolve_scheduler(name, scheduler) if scheduler is not None else type(pipe.scheduler)
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **(scheduler_kwargs or {}))

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            # Models built from configs start in train mode: T5 dropout and DiT's label dropout would make runs
            # non-deterministic, so put everything in eval mode like from_pretrained does.
            component.to(device="cpu", dtype=torch.float32).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sd(prediction_type: str = "epsilon", scheduler: str | type | None = None, **kwargs: Any):
    """Tiny StableDiffusionPipeline whose scheduler config says ``prediction_type`` ("epsilon" / "v_prediction")."""
    return build("sd", scheduler, prediction_type=prediction_type, **kwargs)


def denoiser(pipe) -> torch.nn.Module:
    """The pipeline's denoiser (``pipe.unet`` or ``pipe.transformer``)."""
    return pipe.unet if hasattr(pipe, "unet") and pipe.unet is not None else pipe.transformer


def call_kwargs(
    name: str,
    *,
    cfg: bool = True,
    negative_prompt: bool = False,
    num_images_per_prompt: int = 1,
    batch_size: int = 2,
    **overrides: Any,
) -> dict[str, Any]:
    """Small ``__call__`` kwargs for ``build(name)``: ``batch_size`` prompts / class labels, 3 steps, 32x32, "pt".

    Use as ``pipe(**call_kwargs(name), generator=torch.Generator().manual_seed(0))``.

    Args:
        cfg: turn the pipeline's own CFG on (default) or off.  On means ``guidance_scale`` > 1 for every pipeline
            except Flux, where it means ``true_cfg_scale`` > 1 *plus* a ``negative_prompt`` (empty strings unless
            ``negative_prompt=True``); Flux's ``guidance_scale`` stays at the distilled value 3.5 either way.  Off
            means ``guidance_scale=1.0`` (Flux: ``true_cfg_scale=1.0`` and no negative prompt).
        negative_prompt: add one negative prompt per prompt (not supported by "dit"; for a pipeline whose CFG is
            off the negative prompt is ignored by the pipeline).
        num_images_per_prompt: images per prompt (not supported by "dit": it raises ValueError if != 1).
        batch_size: number of prompts / class labels (at most 2).
        overrides: any other kwargs, merged last.
    """
    if name not in PIPELINE_NAMES:
        raise ValueError(f"unknown tiny pipeline {name!r}; expected one of {PIPELINE_NAMES}")
    if not 1 <= batch_size <= len(PROMPTS):
        raise ValueError(f"batch_size must be 1..{len(PROMPTS)}")
    if name == "dit":
        if negative_prompt:
            raise ValueError("DiTPipeline is class-conditional and has no negative prompt")
        if num_images_per_prompt != 1:
            raise ValueError("DiTPipeline has no num_images_per_prompt; repeat class_labels instead")
        kwargs: dict[str, Any] = {
            "class_labels": CLASS_LABELS[:batch_size],
            "guidance_scale": _CFG_ON_SCALE[name] if cfg else 1.0,
        }
    else:
        kwargs = {
            "prompt": PROMPTS[:batch_size],
            "height": IMAGE_SIZE[name],
            "width": IMAGE_SIZE[name],
            "num_images_per_prompt": num_images_per_prompt,
        }
        if name == "flux":
            kwargs["guidance_scale"] = _FLUX_DISTILLED_GUIDANCE
            kwargs["true_cfg_scale"] = _CFG_ON_SCALE[name] if cfg else 1.0
            if cfg or negative_prompt:
                kwargs["negative_prompt"] = NEGATIVE_PROMPTS[:batch_size] if negative_prompt else [""] * batch_size
        else:
            kwargs["guidance_scale"] = _CFG_ON_SCALE[name] if cfg else 1.0
            if negative_prompt:
                kwargs["negative_prompt"] = NEGATIVE_PROMPTS[:batch_size]
        if name in ("sd3", "flux", "pixart_alpha", "pixart_sigma"):
            kwargs["max_sequence_length"] = _T5_MAX_SEQUENCE_LENGTH
        if name in ("pixart_alpha", "pixart_sigma"):
            kwargs["clean_caption"] = False  # needs bs4 + ftfy
            kwargs["use_resolution_binning"] = False  # binning only knows 256..2048 px checkpoints
    kwargs["num_inference_steps"] = 3
    kwargs["output_type"] = "pt"
    kwargs.update(overrides)
    return kwargs
