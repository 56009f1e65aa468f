"""Diffusers classes the hook cannot guide exactly, each with its own reason (`adapter_for` raises with it).

A reason says what about the class stands in the way (a distilled guidance input, a batch of more than two
branches, several predictions, several schedules in one call, a denoiser called outside the CFG pair, ...) and,
where one exists, the class to use instead. `tests/test_pipeline_table.py` checks that every diffusers class that
runs guidance is here or in the adapter rows, never both.
"""

from __future__ import annotations

REFUSED: dict[str, str] = {}


def _refuse(names: str, why: str) -> None:
    REFUSED.update(dict.fromkeys(names.split(), why))


_refuse('Flux2Pipeline FluxControlImg2ImgPipeline FluxControlInpaintPipeline FluxControlNetImg2ImgPipeline '
        'FluxControlNetInpaintPipeline FluxControlPipeline FluxFillPipeline SanaSprintPipeline ',
        'it has a distilled guidance embedding only (guidance_scale is an input of the model) and runs no '
        'unconditional pass to guide; use a pipeline that runs CFG (e.g. FluxPipeline / FluxImg2ImgPipeline with '
        'true_cfg_scale > 1 and a negative prompt)')

_refuse('StableDiffusionInstructPix2PixPipeline ',
        'it runs a three-way batch [text+image; image; none] with two scales (guidance_scale, '
        'image_guidance_scale), a layout the hook does not split yet; use StableDiffusionImg2ImgPipeline')

_refuse('AmusedImg2ImgPipeline AmusedInpaintPipeline AmusedPipeline ',
        "it guides token logits of a masked-token transformer (aMUSEd's UVit2D over VQ codebook ids; u + s (c - u) "
        'on logits, then the scheduler samples tokens), not a noise/velocity prediction')

_refuse('AnyFlowFARPipeline ',
        'it generates the video chunk by chunk (FAR) with a KV cache allocated for the [uncond; cond] batch and '
        'calls the transformer outside the CFG pair to encode each finished chunk into that cache, so the hook can '
        'neither evaluate a subset of rows nor tell cache-encoding calls from guidance calls')

_refuse('CycleDiffusionPipeline ',
        'it runs a four-way batch [source-uncond; target-uncond; source-cond; target-cond] with two scales '
        "(guidance_scale, source_guidance_scale), the source branch reconstructing the input image's DDPM noise for"
        ' the target step; use StableDiffusionImg2ImgPipeline instead')

_refuse('DreamLitePipeline ',
        'it concatenates the (zero or reference) image latents along the width of the denoiser input and keeps only'
        ' the left half of the prediction (the guided sample is not the denoiser input), and with an image (edit '
        'mode) runs a three-way batch [uncond; image; text] with two scales (guidance_scale, image_guidance_scale)')

_refuse('DreamLiteMobilePipeline ',
        'it is CFG-distilled: it runs one conditional call per step with no unconditional pass (guidance_scale and '
        'image_guidance_scale are ignored)')

_refuse('HeliosPipeline ',
        'it generates the video autoregressively chunk by chunk (history latents as inputs), calling '
        'scheduler.set_timesteps anew for each chunk, so one pipeline call holds several denoising schedules (the '
        'hook refuses timesteps replaced mid-call)')

_refuse('HeliosPyramidPipeline ',
        'it denoises each autoregressive video chunk through a resolution pyramid (upsampling the latents and '
        'calling set_timesteps per stage), and with is_cfg_zero_star guides with CFG-Zero* (u scaled by a '
        'per-sample optimized alpha, zeroed first steps) instead of u + s (c - u)')

_refuse('JoyImageEditPlusPipeline ',
        'it packs the target and reference images as padded patch sequences [B, patches, C, pt, ph, pw] with a '
        'target mask, and passes the transformer a per-sample Python list `shape_list` repeated for the [uncond; '
        "cond] batch that the hook's row selection cannot slice (CFG itself is batched u + s (c - u) rescaled to "
        'the conditional norm)')

_refuse('Kandinsky5I2IPipeline ',
        'it appends the reference image latents and a ones mask channel on the last dim of its channels-last (B, 1,'
        ' H, W, C) latents and steps only the first C channels, while the transformer returns C channels; the '
        "hook's sample and extra-channel handling assume channels at dim 1")

_refuse('Kandinsky5T2VPipeline ',
        'it denoises channels-last (B, T, H, W, C) latents and, when the transformer has visual_cond, appends '
        'visual-conditioning channels (zeros + mask) on the last dim and steps only the first C channels; the '
        "hook's sample and extra-channel handling assume channels at dim 1")

_refuse('Kandinsky5I2VPipeline ',
        'it appends visual-conditioning channels (image latents + mask) on the last dim of channels-last (B, T, H, '
        "W, C) latents, steps only the first C channels of frames 1: and keeps the first frame clean; the hook's "
        'sample and extra-channel handling assume channels at dim 1')

_refuse('Kandinsky6TI2VAPipeline ',
        'it runs a joint video-audio transformer that returns two predictions (video and audio), both guided and '
        'stepped by their own schedulers, on channels-last latents carrying visual-conditioning channels (cond '
        'latents + mask, the reference frame as a masked tail frame)')

_refuse('LTX2Pipeline ',
        'it runs a joint audio-video transformer that returns two predictions (video and audio), each guided in x0 '
        'space with its own scale (guidance_scale, audio_guidance_scale), summed with optional STG and '
        'modality-isolation passes that call the transformer again on the conditional rows only')

_refuse('LTX2ImageToVideoPipeline ',
        'it runs a joint audio-video transformer that returns two predictions (video and audio), each guided in x0 '
        'space with its own scale (guidance_scale, audio_guidance_scale), summed with optional STG and '
        'modality-isolation passes that call the transformer again on the conditional rows only; the first frame is'
        ' conditioned with per-token timesteps')

_refuse('LTX2ConditionPipeline ',
        'it runs a joint audio-video transformer that returns two predictions (video and audio), each guided in x0 '
        'space with its own scale (guidance_scale, audio_guidance_scale), summed with optional STG and '
        'modality-isolation passes that call the transformer again on the conditional rows only; keyframe / video '
        'conditions with per-token timesteps')

_refuse('LTX2InContextPipeline ',
        'it runs a joint audio-video transformer that returns two predictions (video and audio), each guided in x0 '
        'space with its own scale (guidance_scale, audio_guidance_scale), summed with optional STG and '
        'modality-isolation passes that call the transformer again on the conditional rows only; IC-LoRA reference '
        'video tokens appended with per-token timesteps')

_refuse('LTXI2VLongMultiPromptPipeline ',
        'it generates long videos in temporal sliding windows, each with its own prompt and a fresh set_timesteps '
        "schedule, injecting the previous window's tail latents (AdaIN-blended), so one pipeline call holds several"
        ' denoising schedules (the hook refuses timesteps replaced mid-call)')

_refuse('LatentConsistencyModelPipeline ',
        'it is guidance-distilled: guidance_scale goes into the UNet as a w-embedding (timestep_cond) and it runs '
        'one conditional call per step with no unconditional pass; use StableDiffusionPipeline instead')

_refuse('LatentConsistencyModelImg2ImgPipeline ',
        'it is guidance-distilled: guidance_scale goes into the UNet as a w-embedding (timestep_cond) and it runs '
        'one conditional call per step with no unconditional pass; use StableDiffusionImg2ImgPipeline instead')

_refuse('SanaSprintImg2ImgPipeline ',
        'it has a distilled guidance embedding only (guidance_scale is an input of the model, scaled by '
        'guidance_embeds_scale) and runs no unconditional pass to guide; use SanaPipeline instead')

_refuse('SemanticStableDiffusionPipeline ',
        'it runs a (2 + n)-way batch [uncond; cond; one row per editing prompt] and adds semantic guidance (SEGA) '
        'terms with per-concept scales, thresholds, warm-up and momentum to u + s (c - u); use '
        'StableDiffusionPipeline instead')

_refuse('StableDiffusionAttendAndExcitePipeline ',
        'it edits latents with gradients of attention maps inside each step (Attend-and-Excite), so the denoiser is'
        ' called outside the CFG batch (conditional rows only, with grad); use StableDiffusionPipeline instead')

_refuse('StableDiffusionParadigmsPipeline ',
        'it runs parallel sampling over a window of timesteps (ParaDiGMS) in one batch of [uncond; cond] x window '
        'rows with per-row timesteps, sliding the window by a tolerance test; use StableDiffusionPipeline instead')

_refuse('StableDiffusionPix2PixZeroPipeline ',
        "it runs two denoising loops in one call (the first records the source prompt's cross-attention maps), and "
        'in the second optimizes the latent by gradients of a cross-attention loss through an extra UNet call per '
        'step (cross-attention guidance), so the denoiser is called outside the CFG pair and with grad')

_refuse('StableDiffusionXLInstructPix2PixPipeline ',
        'it runs a three-way batch [text+image; image; none] with two scales (guidance_scale, '
        'image_guidance_scale), a layout the hook does not split yet; use StableDiffusionXLImg2ImgPipeline')

_refuse('UniDiffuserPipeline ',
        'it runs a multi-modal UViT (image VAE latents, CLIP image embedding and text latents in, three outputs) '
        'whose unconditional branch replaces the other modality by noise at the maximum timestep, over five modes '
        '(joint, text2img, img2text, text, img), guiding as s c + (1 - s) u')

_refuse('VQDiffusionPipeline ',
        'it runs discrete (VQ) diffusion: the transformer predicts log-probabilities of codebook tokens (log '
        'p(x_0)), guided, renormalized with logsumexp and truncated, not a noise/velocity prediction')

_refuse('Cosmos2_5_TransferPipeline ',
        'it generates the video autoregressively in chunks, each a diffusion run of its own (set_timesteps anew, the '
        "previous chunk's frames re-encoded as its conditioning), within one call, for which the hook keeps one step "
        'count and strategy state; its ControlNet also runs outside the hook, before both transformer calls')

_refuse('Cosmos3OmniPipeline ',
        'it runs a unified multimodal transformer on packed unbatched sequences (per-modality token lists, separate'
        ' cond / uncond packings) that returns three predictions (vision, sound, action), each guided and stepped '
        'by its own scheduler')

_refuse('HunyuanImagePipeline ',
        'it has no guidance_scale CFG: it takes a `guider` component (AdaptiveProjectedMixGuidance), switched to an'
        ' `ocr_guider` when the prompt has OCR text, and distilled checkpoints use distilled_guidance_scale as a '
        'model input; use pipelines.StrategyGuider as the guider (and ocr_guider) component')

_refuse('HunyuanImageRefinerPipeline ',
        'it is for guidance-distilled refiners only (distilled_guidance_scale is required and is an input of the '
        'model); any CFG goes through its optional `guider` component (none by default); use '
        'pipelines.StrategyGuider as that component')

_refuse('HunyuanVideo15ImageToVideoPipeline HunyuanVideo15Pipeline MotifVideoImage2VideoPipeline MotifVideoPipeline'
        ' ',
        'it has no guidance_scale CFG: it takes a `guider` component (diffusers ClassifierFreeGuidance / '
        'BaseGuidance) that runs cond / uncond under cache_context; use pipelines.StrategyGuider as that component')

_refuse('OnnxStableDiffusionPipeline ',
        'it runs the UNet as an ONNX Runtime session (OnnxRuntimeModel on NumPy arrays), not a torch module the '
        'hook can wrap; use StableDiffusionPipeline instead')

_refuse('OnnxStableDiffusionImg2ImgPipeline ',
        'it runs the UNet as an ONNX Runtime session (OnnxRuntimeModel on NumPy arrays), not a torch module the '
        'hook can wrap; use StableDiffusionImg2ImgPipeline instead')

_refuse('OnnxStableDiffusionInpaintPipeline ',
        'it runs the UNet as an ONNX Runtime session (OnnxRuntimeModel on NumPy arrays), not a torch module the '
        'hook can wrap; use StableDiffusionInpaintPipeline instead')

_refuse('OnnxStableDiffusionUpscalePipeline ',
        'it runs the UNet as an ONNX Runtime session (OnnxRuntimeModel on NumPy arrays), not a torch module the '
        'hook can wrap; its PyTorch counterpart is StableDiffusionUpscalePipeline (noise_level / class_labels '
        'input)')

_refuse('StableDiffusionOnnxPipeline ',
        'it runs the UNet as an ONNX Runtime session (OnnxRuntimeModel on NumPy arrays), not a torch module the '
        'hook can wrap; it is the deprecated alias of OnnxStableDiffusionPipeline; use StableDiffusionPipeline '
        'instead')

# Video UNets
_refuse("TextToVideoZeroPipeline TextToVideoZeroSDXLPipeline",
        "it denoises in three passes per call (the first frame to t1 and t0, then every frame again from t1 on a "
        "copy of the scheduler), so timesteps repeat and the denoiser batch grows from 2 to 2 x video_length rows "
        "within one call; its cross-frame attention also assumes the [uncond; cond] halves")

# Priors, cascades, audio
_refuse("StableCascadeCombinedPipeline WuerstchenCombinedPipeline",
        "it runs two pipelines in turn, each with its own scale (prior_guidance_scale, decoder_guidance_scale): guide "
        "each stage with apply_guidance(pipe.prior_pipe, ...) and apply_guidance(pipe.decoder_pipe, ...) (both exact, "
        "tested inside the combined call)")
_refuse("KandinskyV22CombinedPipeline KandinskyV22Img2ImgCombinedPipeline KandinskyV22InpaintCombinedPipeline",
        "it runs two pipelines in turn, each with its own scale: guide them as apply_guidance(pipe.prior_pipe, ...) "
        "and apply_guidance(pipe.decoder_pipe, ...) (both exact, tested inside the combined call)")
_refuse("AceStepPipeline",
        "it guides with ACE-Step's own APG (momentum -0.75, norm threshold 2.5, eta 0, c + (s - 1) update) inside "
        "cfg_interval_start / cfg_interval_end, not u + s (c - u), and its cover task adds a third, unguided call")

# Research pipelines
_refuse("VersatileDiffusionDualGuidedPipeline",
        "its dual attention (DualTransformer2DModel) fails in diffusers 0.42.1 before any guidance runs (its forward "
        "rejects the encoder_attention_mask the UNet blocks pass), so no row can be tested on the real layout; use "
        "VersatileDiffusionTextToImagePipeline or VersatileDiffusionImageVariationPipeline")
_refuse("AnyFlowPipeline",
        "it steps FlowMapEulerDiscreteScheduler with a flow map's mean velocity u from t to the next level r "
        "(x_r = x_t - (t - r) u), for which guidance-kit has no parametrization rule (x0 = x - t u holds only at r = 0)")
_refuse("LTX2HDRPipeline",
        "it applies guidance_rescale to x0-space predictions (x0 = x - sigma v, stds taken there) where diffusers' "
        "other pipelines rescale the velocity, and its STG and modality-isolation passes call the transformer again "
        "on the conditional rows only")
_refuse("KandinskyCombinedPipeline KandinskyImg2ImgCombinedPipeline KandinskyInpaintCombinedPipeline",
        "it runs two pipelines in turn, each with its own scale: guide them as apply_guidance(pipe.prior_pipe, ...) "
        "and apply_guidance(pipe.decoder_pipe, ...) (both exact, tested inside the combined call)")

# Stable Diffusion variants
_refuse("StableDiffusionPanoramaPipeline",
        "it runs one UNet call per view window in each step, each on an interleaved batch [uncond, cond, uncond, "
        "cond, ...] (repeat_interleave), where the hook expects one call per step on [uncond; cond]")
_refuse("StableDiffusionGLIGENTextImagePipeline",
        "it calls the UNet twice per step on the full [uncond; cond] batch (with and without grounding tokens) and "
        "takes the unconditional half of one call and the conditional half of the other")

# Image transformers
_refuse("ZImageOmniPipeline",
        "its transformer takes per-sample lists of lists (condition latents and target per sample, SigLIP features, "
        "image_noise_mask), which the hook's layouts cannot split by rows; it shares Z-Image's cfg_truncation")
_refuse("QwenImageLayeredPipeline",
        "its output_type='latent' raises in diffusers 0.42.1 and its other outputs are per-sample lists (the second "
        "sample's empty for batch > 1), so no tiny case can compare it with its native call")
_refuse("QwenImage21Pipeline",
        "its transformer returns the text tokens ahead of the sample's, so its output is longer than its input and "
        "x0-space strategies cannot align the prediction with the sample")
_refuse("Ideogram4Pipeline",
        "its unconditional branch is a second model (unconditional_transformer) on different inputs, with a "
        "per-step guidance_schedule; the hook pairs the conditional and unconditional calls of one denoiser")
_refuse("VisualClozePipeline VisualClozeGenerationPipeline",
        "it has a distilled guidance embedding only (guidance_scale is an input of the model) and runs no "
        "unconditional pass to guide")
_refuse("OmniGenPipeline",
        "its FlowMatchEulerDiscreteScheduler runs with invert_sigmas=True and num_train_timesteps=1, where "
        "guidance-kit's flow rule would read the data fraction as the noise level, and with input_images it runs a "
        "three-way batch with two scales (guidance_scale, img_guidance_scale)")

# Video transformers
_refuse("EasyAnimateControlPipeline",
        "its __call__ passes text_encoder_index=0 to its own encode_prompt, which has no such parameter, so every "
        "call raises in diffusers 0.42.1 and there is no native CFG to match")
_refuse("SkyReelsV2DiffusionForcingPipeline SkyReelsV2DiffusionForcingImageToVideoPipeline "
        "SkyReelsV2DiffusionForcingVideoToVideoPipeline",
        "diffusion forcing steps per-frame copies of the scheduler, never the pipeline's own, and runs frames at "
        "different timesteps, so the noise level of an evaluation cannot be read from the pipeline's scheduler")
_refuse("HunyuanVideoFramepackPipeline",
        "it re-sets its timesteps for every section inside one call and passes each of its two calls its own copy of "
        "the latents, so the conditional and unconditional calls cannot be paired by the shared latent tensor")
_refuse("CosmosVideoToWorldPipeline",
        "it replaces x0 on the conditioning frames by the clean conditioning latents in both branches before guiding, "
        "but its transformer sees those frames only noise-augmented (augment_sigma, a new draw per branch), so the x0 "
        "it guides cannot be read from the denoiser calls and x0-space rules could not be exact")
_refuse("ConsisIDPipeline",
        "it needs opencv-python for its face preprocessing, which the test environment does not install, so diffusers "
        "exposes a stand-in and no tiny case can verify its layout")
