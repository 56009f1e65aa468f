"""Tiny pipelines whose denoiser output is preconditioned (x0 = c_skip x + c_out F), for tests/test_pipeline_zoo.py
(rows in pipelines/adapters.py's "preconditioned denoiser outputs" block; rules in pipelines/preconditioning.py).

Builders use pipeline_zoo's helpers (imported as `zoo`, used inside functions only: pipeline_zoo imports this module
at its end) and cache the models with functools.cache; schedulers are made anew per pipeline (Cosmos 2 writes its
sigma range into its scheduler's config). Random prompt embeddings stand in for the text encoders.
"""

from __future__ import annotations

import functools

import torch

import diffusers
import pipeline_zoo as zoo  # noqa: F401  (helpers: zoo._make, zoo._new, zoo._text, zoo._latent_call, ...)


# --- Stable Audio: 1-D latents, an EDM scheduler that preconditions input and output itself -------------------
@functools.cache
def _stable_audio_models() -> dict:
    transformer = zoo._init(zoo._new(lambda: diffusers.StableAudioDiTModel(
        sample_size=4, in_channels=3, num_layers=2, attention_head_dim=4, num_key_value_attention_heads=2,
        out_channels=3, cross_attention_dim=4, time_proj_dim=8, global_states_input_dim=8,
        cross_attention_input_dim=4), 701), 702)
    vae = zoo._new(lambda: diffusers.AutoencoderOobleck(
        encoder_hidden_size=6, downsampling_ratios=[1, 2], decoder_channels=3, decoder_input_channels=3,
        audio_channels=2, channel_multiples=[2, 4], sampling_rate=4), 703)
    projection = zoo._new(lambda: diffusers.StableAudioProjectionModel(
        text_encoder_dim=4, conditioning_dim=4, min_value=0, max_value=32), 704)
    return dict(transformer=transformer, vae=vae, projection_model=projection)


def _stable_audio():
    # sigma_data = 0.5 (not Stable Audio's 1.0): c_in differs from the VP factor, so the rule's rescaling is exercised
    scheduler = diffusers.EDMDPMSolverMultistepScheduler(solver_order=2, prediction_type="v_prediction",
                                                         sigma_data=0.5, sigma_schedule="exponential")
    return zoo._make("StableAudioPipeline", scheduler=scheduler, **_stable_audio_models())


def _stable_audio_kwargs() -> dict:
    return dict(num_inference_steps=zoo.STEPS, guidance_scale=3.0, output_type="latent", audio_end_in_s=2.0,
                **zoo._text(4, 705))


# --- SD latent upscaler: the pipeline computes c_skip x + c_out F from its UNet's output before its CFG ---------
@functools.cache
def _latent_upscale_unet() -> torch.nn.Module:
    return zoo._init(zoo._new(lambda: diffusers.UNet2DConditionModel(
        act_fn="gelu", attention_head_dim=8, norm_num_groups=None, block_out_channels=[32, 32, 64, 64],
        time_cond_proj_dim=160, conv_in_kernel=1, conv_out_kernel=1, cross_attention_dim=32,
        down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
        in_channels=8, mid_block_type=None, only_cross_attention=False, out_channels=5,
        resnet_time_scale_shift="scale_shift", time_embedding_type="fourier", timestep_post_act="gelu",
        up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D")), 711), 712)


def _latent_upscale():
    return zoo._make("StableDiffusionLatentUpscalePipeline", unet=_latent_upscale_unet(), vae=zoo._sd_parts()["vae"],
                     scheduler=diffusers.EulerDiscreteScheduler(prediction_type="sample"))


def _latent_upscale_kwargs() -> dict:
    kw = zoo._text(32, 713)
    kw.update(pooled_prompt_embeds=zoo._embeds(zoo.BATCH, 32, seed=714),
              negative_pooled_prompt_embeds=zoo._embeds(zoo.BATCH, 32, seed=715))
    image = zoo._embeds(zoo.BATCH, 4, 8, 8, seed=716)  # 4 channels: already latents (no VAE encode)
    return zoo._latent_call(image=image, guidance_scale=3.0, **kw)


# --- Cosmos 2 text-to-image: cond and uncond calls, the pipeline preconditions each and guides c + s (c - u) -----
class _NoGuardrail(diffusers.ModelMixin, diffusers.ConfigMixin):
    """Stands in for the Cosmos guardrail (a large model): the pipeline refuses to run without a safety checker."""

    def __init__(self):
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(1), persistent=False)

    def check_text_safety(self, prompt: str) -> bool:
        return True

    def check_video_safety(self, frames):
        return frames


@functools.cache
def _cosmos2_transformer() -> torch.nn.Module:
    return zoo._init(zoo._new(lambda: diffusers.CosmosTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2,
        text_embed_dim=32, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=True, extra_pos_embed_type="learnable"), 721), 722)


def _cosmos2():
    return zoo._make("Cosmos2TextToImagePipeline", transformer=_cosmos2_transformer(), safety_checker=_NoGuardrail(),
                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True))


def _cosmos2_kwargs() -> dict:
    return zoo._latent_call(height=32, width=32, guidance_scale=3.0, **zoo._text(32, 723))


CASES = {
    "StableAudioPipeline": zoo._case(_stable_audio, _stable_audio_kwargs),
    "StableDiffusionLatentUpscalePipeline": zoo._case(_latent_upscale, _latent_upscale_kwargs),
    "Cosmos2TextToImagePipeline": zoo._case(_cosmos2, _cosmos2_kwargs),
}
