"""What the hook must know about each pipeline family: a table of rows, not a fork.

A row names the denoiser attribute(s), the batch layout (one class each in `pipelines/layouts`),
the call keyword holding the pipeline's own scale, and the few quirks a family has:

- layout "uncond_cond": one batched call on [uncond; cond] (SD, SDXL, SD3, PixArt and their
  img2img / inpaint / ControlNet variants, AuraFlow, Sana, ...); "cond_uncond": [cond; null] (DiT);
- layout "sequential_cache_context": cond and uncond are two calls inside
  `cache_context("cond")` / `cache_context("uncond")` (Flux true CFG, Qwen-Image, Wan, CogView4);
- layout "sequential_call_order": two calls without a context (Flux img2img / inpaint / Kontext,
  Chroma, Lumina 2), told apart by call order and the shared latent tensor;
- `guide_channels_of_input`: learned-sigma models (DiT, PixArt, HunyuanDiT) output 2x the input
  channels; only the first `in_channels` are a prediction of the sample, the rest pass through;
- `extra_input_channels`: inpainting UNets take [latents, mask, masked-image latents] (9 channels);
  the sample (x0 conversions) is the first `out_channels` of them;
- `extra_denoisers` / `expert_scale_kws`: Wan 2.2's second expert `transformer_2` with its own
  `guidance_scale_2`;
- `schedulers` / `denoisers_in_turn`: unCLIP's prior and decoder, each stepped by its own scheduler
  (`prior_scheduler`, `decoder_scheduler`) in a run of its own (steps and strategy state start afresh);
- `negated_output`: Lumina 2's transformer predicts the negated velocity;
- `x0_velocity_floor`: PRX Pixel's transformer predicts x0, which the pipeline turns into the velocity
  (x - x0) / max(t, floor) after its CFG; strategies see that velocity, so x0 and the noise level are the scheduler's;
- `batch_dims`: keywords batched on another dimension than 0 (HiDream's Llama-3 embeddings, (layers, batch,
  tokens, dim)), whose rows the layouts and branches select and concatenate on that dimension.

Rows are keyed by class name; every row is verified by `tests/test_pipeline_zoo.py` on a tiny
pipeline (CFG through the hook equals native CFG). `REFUSED` (pipelines/refusals.py) lists the classes
that cannot be guided and why; docs/pipelines.md is generated from both (`pipelines.support_table`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import diffusers

from .refusals import REFUSED  # noqa: F401  (the classes that cannot be guided, and why)

LAYOUT_ALIASES = {"sequential": "sequential_cache_context"}


@dataclass(frozen=True)
class Adapter:
    denoiser: str  # attribute of the pipeline holding the denoiser
    layout: str  # a key of pipelines.layouts.LAYOUTS
    scale_kw: str  # the call keyword that holds the pipeline's own guidance scale
    enable_hint: str  # how a user turns the pipeline's own guidance on
    sample_kw: str = "sample"  # keyword of the noisy input when passed by name
    guide_channels_of_input: bool = False  # learned sigma: guide out[:, :in_channels], keep the rest
    unbatched: tuple[str, ...] = ()  # tensor kwargs that never carry a batch dimension
    per_frame_kws: tuple[str, ...] = ()  # tensor kwargs with batch x frames rows (AnimateDiff's prompt embeddings)
    # Tensor kwargs whose batch is not on dimension 0, e.g. {"encoder_hidden_states_llama3": 1} (HiDream's
    # (layers, batch, tokens, dim)): rows are selected and concatenated on that dimension. Stored as sorted pairs.
    batch_dims: tuple[tuple[str, int], ...] = ()
    timestep_kw: str = "timestep"  # keyword of the timestep when passed by name (HiDream: "timesteps")
    # The denoiser's timestep is a ratio in [0, 1] (Würstchen's `r`, Stable Cascade's `timestep_ratio`): "stepped"
    # when the pipeline steps its scheduler with it, "converted" when it steps other schedulers with their own
    # timesteps[i] (pipelines/timestep_ratio.py).
    timestep_ratio: str | None = None
    passthrough_kws: tuple[str, ...] = ()  # a call with one of these set is not a guidance call
    class_kw: str | None = None  # class-conditional denoisers: the keyword carrying the class ids
    extra_denoisers: tuple[str, ...] = ()  # further experts (Wan 2.2 transformer_2), hooked where not None
    expert_scale_kws: tuple[str, ...] = ()  # their scale keywords (None in the call: the main scale)
    needs_negative: bool = False  # true-CFG pipelines: no unconditional pass without a negative prompt
    extra_input_channels: bool = False  # input = [sample, conditioning channels] (9-channel inpainting)
    negated_output: bool = False  # the denoiser predicts the negated velocity (Lumina 2)
    # The denoiser predicts x0 and the pipeline steps its flow scheduler with (x - x0) / max(t, floor), t the
    # denoiser's timestep (PRX Pixel: 0.05): strategies see that velocity (the x0 = x - s v the scheduler steps with).
    x0_velocity_floor: float | None = None
    guided_channels: int | None = None  # the pipeline guides only these leading channels (Lumina v1: 3 of 4)
    off_kws: tuple[str, ...] = ()  # call keywords that must be off (PAG's extra branch, Bria's normalize): refused otherwise
    # The pipeline's scale s is CFG's w = s + scale_offset (Kandinsky 3 and Z-Image guide as c + s (c - u)),
    # and it runs its unconditional branch when s > on_above.
    scale_offset: float = 0.0
    on_above: float = 1.0
    # The pipeline starts part-way into its timesteps without set_begin_index (Wan video-to-video): the first
    # step's sigma index is read from the timestep, as the scheduler's own step will.
    first_step_from_timestep: bool = False
    # The axis of the sample's channels where conditioning is appended (5-D (B, F, C, H, W) video latents: 2).
    channel_dim: int = 1
    # Call keywords whose value must equal the scale keyword's (Stable Video Diffusion guides each frame with its
    # own scale, linspace(min_guidance_scale, max_guidance_scale): one scale per sample only when they are equal).
    same_scale_kws: tuple[str, ...] = ()
    # The pipeline attribute of the scheduler stepping each denoiser (unCLIP: prior_scheduler, decoder_scheduler);
    # denoisers past the end of the tuple use the first.
    schedulers: tuple[str, ...] = ("scheduler",)
    # The denoisers run one after the other as separate diffusion runs (unCLIP: the prior, then the decoder), each
    # with its own scheduler, steps and scale; the pipeline runs CFG in both when any of its scales is above on_above.
    denoisers_in_turn: bool = False
    # The pipeline itself turns the denoiser output F into x0 = c_skip x + c_out F before its CFG: the name of its
    # rule in pipelines.preconditioning.PIPELINE_RULES ("latent_upscale", "cosmos2", "cosmos2_video"), which x0-space
    # rules read.
    preconditioning: str | None = None
    note: str = ""  # shown in the README table

    def __post_init__(self) -> None:
        from .layouts import LAYOUTS  # here, not at import: layouts import nothing from adapters

        layout = LAYOUT_ALIASES.get(self.layout, self.layout)
        if layout not in LAYOUTS:
            raise ValueError(f"Adapter: layout={self.layout!r} is unknown; allowed: {', '.join(LAYOUTS)}")
        object.__setattr__(self, "layout", layout)
        from .preconditioning import PIPELINE_RULES

        if self.preconditioning is not None and self.preconditioning not in PIPELINE_RULES:
            raise ValueError(f"Adapter: preconditioning={self.preconditioning!r} is unknown; allowed: None, "
                             f"{', '.join(map(repr, PIPELINE_RULES))}")
        if self.x0_velocity_floor is not None and not self.x0_velocity_floor > 0:
            raise ValueError(f"Adapter: x0_velocity_floor={self.x0_velocity_floor!r} is invalid; allowed: None or a "
                             "positive number (the floor of t in (x - x0) / max(t, floor))")
        if self.timestep_ratio not in (None, "stepped", "converted"):
            raise ValueError(f"Adapter: timestep_ratio={self.timestep_ratio!r} is unknown; allowed: None, 'stepped', "
                             "'converted'")
        try:
            dims = dict(self.batch_dims)  # a dict or (keyword, dimension) pairs
        except (TypeError, ValueError):
            dims = {None: None}
        if not all(isinstance(k, str) and type(d) is int and d >= 0 for k, d in dims.items()):
            raise ValueError(f"Adapter: batch_dims={self.batch_dims!r} is invalid; allowed: a dict of keyword name "
                             "-> non-negative dimension index, e.g. {'encoder_hidden_states_llama3': 1}")
        object.__setattr__(self, "batch_dims", tuple(sorted(dims.items())))

    @property
    def denoisers(self) -> tuple[str, ...]:
        return (self.denoiser,) + self.extra_denoisers

    def scheduler_of(self, pipe, expert: int = 0):
        """The scheduler that steps denoiser `expert` (None where the pipeline has none)."""
        return getattr(pipe, self.schedulers[min(expert, len(self.schedulers) - 1)], None)

    @property
    def batch_dim_of(self) -> dict[str, int]:
        """`batch_dims` as keyword -> dimension (what the row-selection helpers take)."""
        return dict(self.batch_dims)


_SD_HINT = "call the pipeline with guidance_scale > 1 (the strategy's own scale, if set, still decides the strength)"
_TRUE_CFG_HINT = ("call the pipeline with true_cfg_scale > 1 and a negative_prompt (\"\" works): it runs its "
                  "unconditional branch only then")

_UNET = Adapter("unet", "uncond_cond", "guidance_scale", _SD_HINT)
_DIT = Adapter("transformer", "uncond_cond", "guidance_scale", _SD_HINT, sample_kw="hidden_states")
_FLUX = Adapter("transformer", "sequential_call_order", "true_cfg_scale", _TRUE_CFG_HINT, sample_kw="hidden_states",
                unbatched=("txt_ids", "img_ids"), needs_negative=True)


def _rows(base: Adapter, names: str, **changes) -> dict[str, Adapter]:
    adapter = replace(base, **changes)
    return {name: adapter for name in names.split()}


# Class name in diffusers -> adapter. Names keep the table importable on diffusers versions that
# lack one of the classes.
DIFFUSERS_ADAPTERS: dict[str, Adapter] = {
    **_rows(_UNET, "StableDiffusionPipeline StableDiffusionImg2ImgPipeline StableDiffusionControlNetPipeline "
                   "StableDiffusionControlNetImg2ImgPipeline StableDiffusionXLPipeline "
                   "StableDiffusionXLImg2ImgPipeline StableDiffusionXLControlNetPipeline "
                   "StableDiffusionXLControlNetImg2ImgPipeline"),
    **_rows(_UNET, "StableDiffusionInpaintPipeline StableDiffusionControlNetInpaintPipeline "
                   "StableDiffusionXLInpaintPipeline StableDiffusionXLControlNetInpaintPipeline",
            extra_input_channels=True),
    # SD3's own skip-layer guidance pass on the cond half is not a CFG call.
    **_rows(_DIT, "StableDiffusion3Pipeline StableDiffusion3Img2ImgPipeline StableDiffusion3InpaintPipeline",
            passthrough_kws=("skip_layers",)),
    # PixArt's learned-sigma channels are dropped by the pipeline after CFG: guide the eps half only.
    **_rows(_DIT, "PixArtAlphaPipeline PixArtSigmaPipeline", guide_channels_of_input=True),
    "DiTPipeline": replace(_DIT, layout="cond_uncond", guide_channels_of_input=True, class_kw="class_labels"),
    "FluxPipeline": replace(_FLUX, layout="sequential_cache_context", note="packed token latents"),
    **_rows(_FLUX, "FluxImg2ImgPipeline FluxInpaintPipeline FluxKontextPipeline",
            note="packed token latents"),
    **_rows(_FLUX, "ChromaPipeline ChromaImg2ImgPipeline", scale_kw="guidance_scale", enable_hint=_SD_HINT,
            needs_negative=False, note="packed token latents"),
    **_rows(_DIT, "AuraFlowPipeline SanaPipeline"),
    **_rows(_DIT, "LTXPipeline", note="packed token latents"),
    # use_dynamic_cfg changes the pipeline's scale at every step: refused, not silently replaced by the call's
    **_rows(_DIT, "CogVideoXPipeline", note="5-D video latents (B, F, C, H, W)", off_kws=("use_dynamic_cfg",)),
    **_rows(_DIT, "HunyuanDiTPipeline", guide_channels_of_input=True, unbatched=("image_rotary_emb",)),
    "QwenImagePipeline": replace(_FLUX, layout="sequential_cache_context", unbatched=(),
                                 note="rescales to the conditional norm after its CFG; packed token latents"),
    "WanPipeline": replace(_DIT, layout="sequential_cache_context", extra_denoisers=("transformer_2",),
                           expert_scale_kws=("guidance_scale_2",),
                           note="5-D video latents; Wan 2.2's second expert transformer_2 with guidance_scale_2"),
    "CogView4Pipeline": replace(_DIT, layout="sequential_cache_context"),
    "Lumina2Pipeline": replace(_DIT, layout="sequential_call_order", negated_output=True,
                               note="rescales to the conditional norm after its CFG; cfg_trunc_ratio < 1 is "
                                    "refused at the step where it stops the unconditional call"),
}

DIFFUSERS_ADAPTERS.update({
    **_rows(DIFFUSERS_ADAPTERS["QwenImagePipeline"], "QwenImageImg2ImgPipeline QwenImageInpaintPipeline"),
    "FluxKontextInpaintPipeline": DIFFUSERS_ADAPTERS["FluxKontextPipeline"],
    "FluxControlNetPipeline": DIFFUSERS_ADAPTERS["FluxImg2ImgPipeline"],
    "StableDiffusion3ControlNetPipeline": DIFFUSERS_ADAPTERS["StableDiffusion3Pipeline"],
    "StableDiffusionDepth2ImgPipeline": replace(_UNET, extra_input_channels=True,
                                                note="5-channel UNet (latents + depth)"),
    **_rows(_UNET, "AnimateDiffPipeline AnimateDiffVideoToVideoPipeline", per_frame_kws=("encoder_hidden_states",),
            note="UNetMotionModel, 5-D video latents (B, C, F, H, W)"),
    "LTXImageToVideoPipeline": replace(DIFFUSERS_ADAPTERS["LTXPipeline"],
                                       note="packed token latents; per-token timesteps (the first frame is clean)"),
})

# Lumina-Next guides 3 of its 4 latent channels ("for exact reproducibility" of the original code).
DIFFUSERS_ADAPTERS["LuminaPipeline"] = replace(_DIT, layout="cond_uncond", guide_channels_of_input=True,
                                               guided_channels=3, negated_output=True,
                                               note="guides latent channels 0-2 only, as the pipeline does")

# Kandinsky 2.2 decoders: image embeddings from the prior; learned-sigma UNet (9 channels in inpainting).
_KANDINSKY = replace(_UNET, guide_channels_of_input=True)
DIFFUSERS_ADAPTERS.update({
    **_rows(_KANDINSKY, "KandinskyV22Pipeline KandinskyV22Img2ImgPipeline"),
    "KandinskyV22InpaintPipeline": replace(_KANDINSKY, extra_input_channels=True),
})

# PAG pipelines run plain CFG when pag_scale=0; with PAG on they append a third (perturbed) chunk.
_PAG_OFF = dict(off_kws=("pag_scale",))
DIFFUSERS_ADAPTERS.update({
    **_rows(_UNET, "StableDiffusionPAGPipeline StableDiffusionPAGImg2ImgPipeline StableDiffusionControlNetPAGPipeline "
                   "StableDiffusionXLPAGPipeline StableDiffusionXLPAGImg2ImgPipeline "
                   "StableDiffusionXLControlNetPAGPipeline StableDiffusionXLControlNetPAGImg2ImgPipeline", **_PAG_OFF),
    **_rows(_UNET, "StableDiffusionPAGInpaintPipeline StableDiffusionControlNetPAGInpaintPipeline "
                   "StableDiffusionXLPAGInpaintPipeline", extra_input_channels=True, **_PAG_OFF),
    **_rows(_DIT, "StableDiffusion3PAGPipeline StableDiffusion3PAGImg2ImgPipeline SanaPAGPipeline", **_PAG_OFF),
    "PixArtSigmaPAGPipeline": replace(DIFFUSERS_ADAPTERS["PixArtSigmaPipeline"], **_PAG_OFF),
    "HunyuanDiTPAGPipeline": replace(DIFFUSERS_ADAPTERS["HunyuanDiTPipeline"], **_PAG_OFF),
})

# --- rows per family, each verified by its case in tests/zoo_<family>.py --------------------------------
# UNet image pipelines beyond SD / SDXL's own (tests/zoo_unet.py)
DIFFUSERS_ADAPTERS.update({
    **_rows(_UNET, "KolorsPipeline KolorsImg2ImgPipeline StableDiffusionXLControlNetUnionPipeline "
                   "StableDiffusionXLControlNetUnionImg2ImgPipeline StableDiffusionXLControlNetUnionInpaintPipeline "
                   "StableDiffusionAdapterPipeline StableDiffusionXLAdapterPipeline"),
    "KolorsPAGPipeline": replace(_UNET, **_PAG_OFF),
    **_rows(_UNET, "StableDiffusionControlNetXSPipeline StableDiffusionXLControlNetXSPipeline",
            note="UNetControlNetXSModel (the UNet fused with its ControlNet-XS adapter)"),
    **_rows(_UNET, "StableDiffusionImageVariationPipeline StableDiffusionLDM3DPipeline StableDiffusionGLIGENPipeline "
                   "AltDiffusionPipeline AltDiffusionImg2ImgPipeline"),
    "PaintByExamplePipeline": replace(_UNET, extra_input_channels=True),
    "StableDiffusionUpscalePipeline": replace(_UNET, extra_input_channels=True,
                                              note="7-channel UNet (latents + noised low-res image)"),
    # The hint rides in added_cond_kwargs; the UNet appends its encoding to the latents inside forward.
    **_rows(_KANDINSKY, "KandinskyV22ControlnetPipeline KandinskyV22ControlnetImg2ImgPipeline"),
    **_rows(_UNET, "StableUnCLIPPipeline StableUnCLIPImg2ImgPipeline",
            note="the noised CLIP image embedding enters as class labels; the prior's own CFG is not hooked"),
    "LDMTextToImagePipeline": _UNET,
    **_rows(_KANDINSKY, "KandinskyPipeline KandinskyImg2ImgPipeline", note="Kandinsky 2.1 decoder"),
    "KandinskyInpaintPipeline": replace(_KANDINSKY, extra_input_channels=True, note="Kandinsky 2.1 decoder"),
    # Self-attention guidance (sag_scale > 0, default 0.75) adds a UNet call on degraded latents.
    "StableDiffusionSAGPipeline": replace(_UNET, off_kws=("sag_scale",),
                                          note="call with sag_scale=0 (self-attention guidance adds a UNet call)"),
})

# UNet video pipelines (tests/zoo_unet_video.py)
DIFFUSERS_ADAPTERS.update({
    "AnimateDiffSDXLPipeline": DIFFUSERS_ADAPTERS["AnimateDiffPipeline"],
    "AnimateDiffPAGPipeline": replace(DIFFUSERS_ADAPTERS["AnimateDiffPipeline"], **_PAG_OFF),
    "PIAPipeline": replace(DIFFUSERS_ADAPTERS["AnimateDiffPipeline"], extra_input_channels=True,
                           note="UNetMotionModel with a 9-channel input (latents + mask + image latents), "
                                "5-D video latents (B, C, F, H, W)"),
    **_rows(_UNET, "TextToVideoSDPipeline VideoToVideoSDPipeline",
            note="UNet3DConditionModel, 5-D video latents (B, C, F, H, W)"),
    "I2VGenXLPipeline": replace(_UNET, note="I2VGenXLUNet (image latents and CLIP image embeddings as keywords), "
                                            "5-D video latents (B, C, F, H, W)"),
    # ControlNet residuals come per frame (2B x frames rows), like the prompt embeddings.
    "AnimateDiffControlNetPipeline": replace(
        DIFFUSERS_ADAPTERS["AnimateDiffPipeline"],
        per_frame_kws=("encoder_hidden_states", "down_block_additional_residuals", "mid_block_additional_residual"),
        note="UNetMotionModel with per-frame ControlNet residuals, 5-D video latents (B, C, F, H, W)"),
})
# SVD: image latents appended on axis 2 of (B, F, C, H, W), zeroed in the unconditional half; one scale per
# sample only when min_guidance_scale == max_guidance_scale (its default ramp is refused, naming both)
DIFFUSERS_ADAPTERS["StableVideoDiffusionPipeline"] = replace(
    _UNET, scale_kw="max_guidance_scale", extra_input_channels=True, channel_dim=2, same_scale_kws=("min_guidance_scale",),
    enable_hint="call it with min_guidance_scale == max_guidance_scale > 1",
    note="5-D video latents (B, F, C, H, W), image latents appended on axis 2; min_guidance_scale must equal "
         "max_guidance_scale (the per-frame ramp is refused)")
DIFFUSERS_ADAPTERS.update({name: DIFFUSERS_ADAPTERS["AnimateDiffControlNetPipeline"]
                           for name in ("AnimateDiffVideoToVideoControlNetPipeline", "AnimateDiffSparseControlNetPipeline")})

# video transformers (tests/zoo_video.py)
DIFFUSERS_ADAPTERS.update({
    # Wan 2.1 I2V: [latents, first-frame mask, first-frame latents] on channels (36); Wan 2.2 expert as in WanPipeline
    "WanImageToVideoPipeline": replace(DIFFUSERS_ADAPTERS["WanPipeline"], extra_input_channels=True,
                                       note="5-D video latents; first-frame conditioning on channels (the sample is "
                                            "the first out_channels); Wan 2.2's transformer_2 with guidance_scale_2"),
    # VACE: the control context is the same in both calls; its per-layer scales are no batch
    "WanVACEPipeline": replace(DIFFUSERS_ADAPTERS["WanPipeline"], unbatched=("control_hidden_states_scale",),
                               note="5-D video latents; VACE control context; Wan 2.2's transformer_2 with "
                                    "guidance_scale_2"),
    "WanAnimatePipeline": replace(_DIT, layout="sequential_cache_context", extra_input_channels=True,
                                  note="5-D video latents; reference latents on channels; the unconditional call "
                                       "blanks the face video; one segment per call (the pipeline re-sets its "
                                       "timesteps between segments)"),
    "WanVideoToVideoPipeline": replace(DIFFUSERS_ADAPTERS["WanPipeline"], layout="sequential_call_order",
                                       extra_denoisers=(), expert_scale_kws=(), first_step_from_timestep=True,
                                       note="5-D video latents; cond and uncond calls without a cache context; it "
                                            "enters its schedule part-way without a begin index"),
    "SkyReelsV2Pipeline": replace(_DIT, layout="sequential_cache_context", note="5-D video latents (Wan layout)"),
    "SkyReelsV2ImageToVideoPipeline": replace(_DIT, layout="sequential_cache_context", extra_input_channels=True,
                                              note="5-D video latents; first-frame conditioning on channels"),
    "CogVideoXVideoToVideoPipeline": DIFFUSERS_ADAPTERS["CogVideoXPipeline"],
    # Mochi steps FlowMatch Euler with invert_sigmas (the table holds 1 - s): its transformer predicts x0 - eps
    "MochiPipeline": replace(_DIT, negated_output=True,
                             note="5-D video latents; its scheduler's sigmas inverted (read as 1 - sigma)"),
    # LongCat-AudioDiT: the same scheduler and output as Mochi, in a conditional then an unconditional call (no
    # cache context), guided as u + s (c - u) when s > 1
    "LongCatAudioDiTPipeline": replace(_DIT, layout="sequential_call_order", negated_output=True,
                                       note="(B, T, C) audio latents; its scheduler's sigmas inverted (read as "
                                            "1 - sigma)"),
    # image / control-video latents appended on the channel axis 2 of (B, F, C, H, W): x0 from the first C
    **_rows(DIFFUSERS_ADAPTERS["CogVideoXPipeline"], "CogVideoXImageToVideoPipeline CogVideoXFunControlPipeline",
            extra_input_channels=True, channel_dim=2,
            note="5-D video latents (B, F, C, H, W), conditioning latents appended on axis 2"),
    # LTX conditions: scheduler.step(-noise_pred, per_token_timesteps=...) with dt = sigma - next_sigma is the usual
    # Euler step, so the transformer predicts the usual velocity (no negated_output)
    "LTXConditionPipeline": replace(DIFFUSERS_ADAPTERS["LTXPipeline"],
                                    note="packed token latents; per-token timesteps (conditioning tokens are clean)"),
    "AllegroPipeline": replace(_DIT, note="5-D video latents"),
    # Latte's learned-sigma channels are dropped by the pipeline after CFG: guide the eps half only.
    "LattePipeline": replace(_DIT, guide_channels_of_input=True, note="5-D video latents; learned sigma"),
    # EasyAnimate's inpaint latents are a keyword (2B rows) the transformer concatenates itself
    **_rows(_DIT, "EasyAnimatePipeline EasyAnimateInpaintPipeline", note="5-D video latents"),
    "SanaVideoPipeline": replace(_DIT, note="5-D video latents"),
    "SanaImageToVideoPipeline": replace(_DIT, note="5-D video latents; per-frame timesteps (the first frame is clean)"),
    "ChronoEditPipeline": replace(_DIT, layout="sequential_call_order", extra_input_channels=True,
                                  note="5-D video latents; first-frame conditioning on channels; cond and uncond calls "
                                       "without a cache context"),
    "LucyEditPipeline": replace(DIFFUSERS_ADAPTERS["WanPipeline"], extra_input_channels=True,
                                note="5-D video latents; the input video's latents on channels; Wan 2.2's "
                                     "transformer_2 with guidance_scale_2"),
    # HunyuanVideo: true CFG (true_cfg_scale > 1 and a negative prompt); guidance_scale only feeds the distilled
    # guidance embedding, the same in both calls
    "HunyuanVideoPipeline": replace(_FLUX, layout="sequential_cache_context", unbatched=(),
                                    note="5-D video latents; true CFG on top of the distilled guidance embedding"),
    **_rows(_FLUX, "HunyuanVideoImageToVideoPipeline HunyuanSkyreelsImageToVideoPipeline", unbatched=(),
            extra_input_channels=True,
            note="5-D video latents; image latents (and mask) on channels; true CFG, calls without a cache context"),
})

# image transformers (tests/zoo_image.py)
DIFFUSERS_ADAPTERS.update({
    **_rows(DIFFUSERS_ADAPTERS["QwenImagePipeline"], "QwenImageControlNetPipeline QwenImageControlNetInpaintPipeline"),
    # The edit variants append the condition image's tokens to the sample's: the strategy sees both (the pipeline
    # keeps the sample's tokens after its CFG).
    **_rows(DIFFUSERS_ADAPTERS["QwenImagePipeline"],
            "QwenImageEditPipeline QwenImageEditPlusPipeline QwenImageEditInpaintPipeline",
            note="rescales to the conditional norm after its CFG; packed token latents, condition-image tokens "
                 "appended"),
    "ChromaInpaintPipeline": DIFFUSERS_ADAPTERS["ChromaPipeline"],
    "CogView4ControlPipeline": replace(_DIT, layout="sequential_call_order", extra_input_channels=True,
                                       note="control latents concatenated on channels"),
    "SanaControlNetPipeline": DIFFUSERS_ADAPTERS["SanaPipeline"],
    "HunyuanDiTControlNetPipeline": DIFFUSERS_ADAPTERS["HunyuanDiTPipeline"],
    "StableDiffusion3ControlNetInpaintingPipeline": DIFFUSERS_ADAPTERS["StableDiffusion3ControlNetPipeline"],
    "CogView3PlusPipeline": _DIT,
    **_rows(_FLUX, "Flux2KleinPipeline Flux2KleinInpaintPipeline", layout="sequential_cache_context",
            scale_kw="guidance_scale", enable_hint=_SD_HINT, needs_negative=False, unbatched=(),
            note="packed token latents; a distilled Klein (is_distilled) runs no CFG"),
    "OvisImagePipeline": replace(_FLUX, layout="sequential_cache_context", scale_kw="guidance_scale",
                                 enable_hint=_SD_HINT, needs_negative=False, note="packed token latents"),
    "LongCatImageEditPipeline": replace(_FLUX, layout="sequential_cache_context", scale_kw="guidance_scale",
                                        enable_hint=_SD_HINT, needs_negative=False,
                                        note="packed token latents, condition-image tokens appended"),
    "LongCatImagePipeline": replace(_FLUX, layout="sequential_cache_context", scale_kw="guidance_scale",
                                    enable_hint=_SD_HINT, needs_negative=False,
                                    note="renormalises to the conditional norm after its CFG (enable_cfg_renorm); "
                                         "packed token latents"),
    "GlmImagePipeline": replace(_DIT, layout="sequential_call_order",
                                note="text-to-image; a condition image adds a KV-cache pre-pass call of the "
                                     "transformer, which the call-order layout does not expect (it raises)"),
    "NucleusMoEImagePipeline": replace(_DIT, layout="sequential_call_order", negated_output=True,
                                       note="rescales to the conditional norm after its CFG; packed token latents"),
    # normalize=True rescales by the std of the batch's conditional half after CFG: refused, not reproduced
    "BriaPipeline": replace(_DIT, unbatched=("txt_ids", "img_ids"), off_kws=("normalize",),
                            note="packed token latents"),
    **_rows(_DIT, "BriaFiboPipeline BriaFiboEditPipeline", unbatched=("txt_ids", "img_ids"),
            note="packed token latents"),
    "PRXPipeline": _DIT,
    # PRX Pixel guides the x0 predictions, then steps (x - x0) / max(t, 0.05): affine and the same in both rows, so
    # CFG commutes with it; strategies see that velocity (its x0 below t = 0.05 is (1 - s / 0.05) x + (s / 0.05) x0)
    "PRXPixelPipeline": replace(_DIT, x0_velocity_floor=0.05,
                                note="pixel space; the transformer predicts x0, stepped as the velocity "
                                     "(x - x0) / max(t, 0.05), which strategies see"),
    "ErnieImagePipeline": _DIT,
    # Z-Image: one [cond; uncond] call on per-sample lists ([C, 1, H, W] latents, caption features of different
    # lengths) returning a list; it steps with the negated output and guides as c + s (c - u), on when s > 0.
    # cfg_normalization clips to the conditional norm after its CFG: refused; cfg_truncation < 1: refused (hook).
    **_rows(_DIT, "ZImagePipeline ZImageImg2ImgPipeline ZImageInpaintPipeline", layout="cond_uncond", sample_kw="x",
            negated_output=True, scale_offset=1.0, on_above=0.0, off_kws=("cfg_normalization",),
            enable_hint="call the pipeline with guidance_scale > 0 (the strategy's own scale, if set, still decides "
                        "the strength)",
            note="per-sample latent lists (one [C, 1, H, W] tensor per row); cfg_truncation < 1 is refused"),
})
# The ControlNet residuals are padded to the longest sequence of the whole [cond; uncond] batch.
DIFFUSERS_ADAPTERS.update({
    **_rows(DIFFUSERS_ADAPTERS["ZImagePipeline"], "ZImageControlNetPipeline ZImageControlNetInpaintPipeline",
            note="per-sample latent lists (one [C, 1, H, W] tensor per row); cfg_truncation < 1 is refused; a step "
                 "that evaluates only some rows fails where an unconditional caption is longer (in 32-token blocks) "
                 "than every conditional caption it evaluates"),
})

# cascades, priors, scale conventions, audio and 3-D (tests/zoo_cascades.py)
DIFFUSERS_ADAPTERS.update({
    # Shap-E's prior outputs [prediction | variance] on the last axis of (B, N, D) latents
    "ShapEPipeline": replace(_DIT, denoiser="prior", guide_channels_of_input=True, channel_dim=2,
                             note="(B, N, D) latents; learned variance on the last axis, kept"),
    # Kandinsky 3 guides as (s + 1) c - s u (CFG's w = s + 1), its unconditional branch on when s > 1.
    **_rows(_UNET, "Kandinsky3Pipeline Kandinsky3Img2ImgPipeline", scale_offset=1.0, on_above=1.0,
            note="guides as (s + 1) c - s u: a strategy sees w = guidance_scale + 1"),
    # DeepFloyd IF: learned variance (6 output channels, the pipeline keeps the conditional variance).
    **_rows(_UNET, "IFPipeline IFImg2ImgPipeline IFInpaintingPipeline", guide_channels_of_input=True,
            note="pixel space; learned variance: guides the eps channels, keeps the conditional variance"),
    # The super-resolution stages take [noisy image; upscaled image] (6 channels) and the noise level as class labels.
    **_rows(_UNET, "IFSuperResolutionPipeline IFImg2ImgSuperResolutionPipeline IFInpaintingSuperResolutionPipeline",
            guide_channels_of_input=True, extra_input_channels=True,
            note="pixel space; input [noisy image; upscaled image]; learned variance kept from the conditional branch"),
    **_rows(_UNET, "AudioLDMPipeline MusicLDMPipeline", note="mel-spectrogram latents; CLAP embedding as class labels"),
    "AudioLDM2Pipeline": replace(_UNET, note="mel-spectrogram latents; two cross-attention streams (GPT-2 and T5)"),
    "StableAudio3Pipeline": replace(_DIT, note="1-D audio latents (B, C, T); the duration is a cross-attention token"),
})

# unCLIP and the Kandinsky priors on UnCLIPScheduler (tests/zoo_unclip.py). The PriorTransformer takes its sample
# positionally and predicts x0 of a CLIP image embedding (B, D); proj_embedding, encoder_hidden_states and
# attention_mask carry the batch. unCLIP's decoder UNet predicts [eps | variance] (learned_range), the pipeline keeps
# the conditional variance; its super-resolution UNets run without guidance.
_UNCLIP_HINT = ("call the pipeline with decoder_guidance_scale > 1 (the strategy's own scale, if set, still decides "
                "the strength)")
DIFFUSERS_ADAPTERS.update({
    **_rows(_DIT, "KandinskyPriorPipeline KandinskyV22PriorPipeline KandinskyV22PriorEmb2EmbPipeline",
            denoiser="prior", note="PriorTransformer on CLIP image embeddings (B, D), predicts x0 (UnCLIPScheduler)"),
    "UnCLIPImageVariationPipeline": replace(_UNET, denoiser="decoder", schedulers=("decoder_scheduler",),
                                            scale_kw="decoder_guidance_scale", enable_hint=_UNCLIP_HINT,
                                            guide_channels_of_input=True,
                                            note="guides the decoder (learned variance kept); super-resolution "
                                                 "runs unguided"),
    # Prior, then decoder: two diffusion runs in one call, each with its own scheduler and scale.
    "UnCLIPPipeline": replace(_UNET, denoiser="prior", extra_denoisers=("decoder",),
                              schedulers=("prior_scheduler", "decoder_scheduler"), scale_kw="prior_guidance_scale",
                              expert_scale_kws=("decoder_guidance_scale",), denoisers_in_turn=True,
                              guide_channels_of_input=True,
                              enable_hint="call the pipeline with prior_guidance_scale > 1 or decoder_guidance_scale "
                                          "> 1 (it then runs CFG in both stages; the strategy's own scale, if set, "
                                          "decides both)",
                              note="guides the prior with prior_guidance_scale, then the decoder with "
                                   "decoder_guidance_scale (each its own run: steps, scheduler, strategy state); "
                                   "super-resolution runs unguided"),
})

# research and single-purpose pipelines (tests/zoo_misc.py)
DIFFUSERS_ADAPTERS.update({
    "StableDiffusionModelEditingPipeline": replace(_UNET, note="the SD loop; edit_model() rewrites cross-attention "
                                                                "weights and calls no denoiser"),
    "StableDiffusionDiffEditPipeline": replace(_UNET, note="guides __call__'s loop; generate_mask() and invert() "
                                                            "are not guided"),
    **_rows(_UNET, "VersatileDiffusionTextToImagePipeline VersatileDiffusionImageVariationPipeline",
            denoiser="image_unet"),
    # BLIP-Diffusion: the cond embeddings carry the subject query tokens, the uncond half is neg_prompt without them
    **_rows(_UNET, "BlipDiffusionPipeline BlipDiffusionControlNetPipeline",
            note="subject query embeddings in the conditional half only (its Q-Former fails under transformers 5; "
                 "tested with a stand-in)"),
    "Kandinsky5T2IPipeline": replace(_DIT, layout="sequential_call_order",
                                     unbatched=("visual_rope_pos", "text_rope_pos"),
                                     note="channels-last (B, 1, H, W, C) latents; cond and uncond calls without a "
                                          "cache context"),
    # SANA-WM steps its scheduler with -noise_pred; per-frame timesteps (B, 1, T) with the first frame at 0
    "SanaWMPipeline": replace(_DIT, negated_output=True, unbatched=("data_info",),
                              note="one image and prompt per call; 5-D video latents (B, C, F, H, W), the first "
                                   "frame kept clean; camera conditioning"),
    "JoyImageEditPipeline": replace(_DIT, layout="sequential_call_order",
                                    note="rescales to the conditional norm after its CFG; 6-D latents (B, items, C, T, "
                                         "H, W), the reference image item kept clean"),
})

# more image transformers (tests/zoo_image2.py)
DIFFUSERS_ADAPTERS.update({
    # Krea 2 guides as c + s (c - u) (CFG's w = s + 1) in two calls, cond first, its unconditional call on when s > 0
    "Krea2Pipeline": replace(_DIT, layout="sequential_call_order", unbatched=("position_ids",), scale_offset=1.0,
                             on_above=0.0,
                             enable_hint="call the pipeline with guidance_scale > 0 (Krea 2's w = guidance_scale + "
                                         "1; the strategy's own scale, if set, still decides the strength)",
                             note="packed token latents; cond and uncond calls without a cache context"),
    # Bria Fibo 2.0 guides as u + s (c - u) in two calls, cond first, on the same latents; ids built inside the model
    "BriaFibo2Pipeline": replace(_DIT, layout="sequential_call_order",
                                 note="cond and uncond calls without a cache context"),
})

# HiDream and Shap-E img2img (tests/zoo_hidream.py)
DIFFUSERS_ADAPTERS.update({
    # HiDream: one [uncond; cond] call; its Llama-3 embeddings are (layers, batch, tokens, dim), the CFG batch on
    # dimension 1; the timestep comes as `timesteps`; it steps its scheduler with the negated output
    "HiDreamImagePipeline": replace(_DIT, negated_output=True, timestep_kw="timesteps",
                                    batch_dims={"encoder_hidden_states_llama3": 1},
                                    note="Llama-3 embeddings batched on dimension 1 (layers, batch, tokens, dim)"),
    # the image variant of Shap-E: the same prior layout, conditioned on CLIP image tokens (zeros unconditionally)
    "ShapEImg2ImgPipeline": replace(DIFFUSERS_ADAPTERS["ShapEPipeline"],
                                    note="(B, N, D) latents; learned variance on the last axis, kept; CLIP image "
                                         "tokens, zeroed in the unconditional half"),
})

# Würstchen and Stable Cascade (tests/zoo_wuerstchen.py): torch.lerp(u, c, s) = u + s (c - u) on [cond; uncond], on
# when s > 1; the denoiser's timestep is a ratio in [0, 1] (pipelines/timestep_ratio.py); the conditioning keywords
# (clip, effnet, clip_text_pooled, clip_img) carry the 2B rows of the batch.
_WUERSTCHEN = replace(_UNET, layout="cond_uncond", sample_kw="x", timestep_kw="r", timestep_ratio="stepped")
_CASCADE = replace(_WUERSTCHEN, sample_kw="sample", timestep_kw="timestep_ratio", timestep_ratio="converted")
DIFFUSERS_ADAPTERS.update({
    "WuerstchenPriorPipeline": replace(_WUERSTCHEN, denoiser="prior",
                                       note="timestep ratio r in [0, 1]; DDPMWuerstchenScheduler only (it steps it "
                                            "with r)"),
    "WuerstchenDecoderPipeline": replace(_WUERSTCHEN, denoiser="decoder",
                                         note="timestep ratio r in [0, 1]; DDPMWuerstchenScheduler only (it steps it "
                                              "with r); the prior's image embeddings, zeroed unconditionally"),
    "StableCascadePriorPipeline": replace(_CASCADE, denoiser="prior",
                                          note="timestep ratio in [0, 1]; other schedulers step at their own "
                                               "timesteps (read there); it never calls scale_model_input"),
    "StableCascadeDecoderPipeline": replace(_CASCADE, denoiser="decoder",
                                            note="timestep ratio in [0, 1]; other schedulers step at their own "
                                                 "timesteps (read there); it never calls scale_model_input; the "
                                                 "prior's image embeddings, zeroed unconditionally"),
})

# preconditioned denoiser outputs, x0 = c_skip x + c_out F (tests/zoo_preconditioned.py)
DIFFUSERS_ADAPTERS.update({
    # its EDM scheduler preconditions input and output itself (x0-space rules: the "preconditioned" scheduler rule)
    "StableAudioPipeline": replace(_DIT, unbatched=("rotary_embedding",),
                                   note="1-D audio latents (B, C, T); its EDM scheduler's x0 = c_skip x + c_out F, "
                                        "read with the scheduler's own coefficients"),
    # UNet input [latents (4); low-res image latents (4)], output [F (4); variance (1)]: guides F, keeps the variance
    "StableDiffusionLatentUpscalePipeline": replace(_UNET, extra_input_channels=True, guide_channels_of_input=True,
                                                    guided_channels=4, preconditioning="latent_upscale",
                                                    note="x0 = the pipeline's own c_skip x + c_out F of the UNet "
                                                         "output; its variance channel kept"),
    # two calls, cond first on the same latents; guides c_skip x + c_out F as c + s (c - u) (CFG's w = s + 1)
    "Cosmos2TextToImagePipeline": replace(_DIT, layout="sequential_call_order", scale_offset=1.0,
                                          preconditioning="cosmos2",
                                          note="x0 = the pipeline's own c_skip x + c_out F of the transformer "
                                               "output; cond and uncond calls without a cache context"),
})

# Cosmos world pipelines: each branch's output turned into x0 (an affine map, the same for both branches) before a
# CFG c + s (c - u), i.e. CFG's w = s + 1 on F (tests/zoo_cosmos.py)
DIFFUSERS_ADAPTERS.update({
    # two calls on the same input; x0 from its EDM scheduler's step (then rewound), which is the scheduler's own
    # precondition_outputs: x0-space rules read it through the EDM scheduler rule
    "CosmosTextToWorldPipeline": replace(_DIT, layout="sequential_call_order", scale_offset=1.0,
                                         note="x0 = its EDM scheduler's c_skip x + c_out F of the transformer output; "
                                              "cond and uncond calls without a cache context"),
    # two calls, each on its own input; x0 replaced by the conditioning latents on the condition_mask frames
    "Cosmos2VideoToWorldPipeline": replace(_DIT, layout="sequential_conditioned_frames", scale_offset=1.0,
                                           preconditioning="cosmos2_video",
                                           note="x0 = the pipeline's own c_skip x + c_out F of the transformer output, "
                                                "and the conditioning latents on the conditioning frames"),
    # two calls on one input; each branch's velocity replaced by the ground truth on the condition_mask frames (the
    # same map in both): strategies see the replaced velocities and the scheduler's sample, so x0 = x - sigma v is
    # the one its flow UniPC steps with
    "Cosmos2_5_PredictBasePipeline": replace(_DIT, layout="sequential_conditioned_velocity", scale_offset=1.0,
                                             note="velocity replaced by the ground truth (latents - cond_latent) on "
                                                  "the conditioning frames in both branches; cond and uncond calls "
                                                  "without a cache context"),
})

# Our own pipelines register here (see pipelines/embedded/pipeline.py).
EXTRA_ADAPTERS: dict[type, Adapter] = {}


def register_adapter(pipeline_class: type, adapter: Adapter) -> None:
    """Teach `apply_guidance` a new pipeline class (e.g. a custom one following a known layout)."""
    EXTRA_ADAPTERS[pipeline_class] = adapter


def supported_pipelines() -> list[str]:
    return sorted(DIFFUSERS_ADAPTERS) + sorted(c.__name__ for c in EXTRA_ADAPTERS)


def adapter_for(pipe) -> Adapter:
    for cls, adapter in EXTRA_ADAPTERS.items():
        if isinstance(pipe, cls):
            return adapter
    # Exact class first: many diffusers pipelines subclass another one with a different layout.
    own = getattr(type(pipe), "_guidance_original_class", type(pipe))  # the class under an applied hook
    name = own.__name__
    cls = getattr(diffusers, name, None)
    if name in DIFFUSERS_ADAPTERS and cls is own:
        return DIFFUSERS_ADAPTERS[name]
    if name in REFUSED and cls is own:
        raise TypeError(f"pipe={name} cannot be guided by apply_guidance: {REFUSED[name]}")
    origin = _origin(own)
    raise TypeError(
        f"pipe={name} is not in guidance-kit's pipeline table ({origin}), so the hook does not know its batch "
        f"layout and will not guess it. If it follows one of the layouts ({', '.join(_layout_names())}), "
        f"register it with pipelines.register_adapter(pipeline_class, Adapter(...))"
    )


def _origin(cls: type) -> str:
    """Why a class has no row: not a pipeline, a subclass of a diffusers class, or a class diffusers lacks."""
    if not issubclass(cls, diffusers.DiffusionPipeline):
        return "not a diffusers pipeline"
    if getattr(diffusers, cls.__name__, None) is cls:
        from .support_table import SCALE_KEYWORDS  # the table's own test of "runs guidance"

        if not any(k in inspect.signature(cls.__call__).parameters for k in SCALE_KEYWORDS):
            return "a diffusers pipeline that runs no guidance: its call takes no guidance scale"
        return f"a diffusers class that guidance-kit's table for diffusers {diffusers.__version__} has no row for"
    for base in cls.__mro__[1:]:
        if getattr(diffusers, base.__name__, None) is base and base is not diffusers.DiffusionPipeline:
            return f"a subclass of diffusers' {base.__name__}: a row does not carry over to subclasses"
    return f"a pipeline class that diffusers {diffusers.__version__} does not have"


def _layout_names() -> list[str]:
    from .layouts import LAYOUTS

    return list(LAYOUTS)
