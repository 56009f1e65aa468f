"""Tiny Cosmos world pipelines for tests/test_pipeline_zoo.py (rows in pipelines/adapters.py's "Cosmos world
pipelines" block): text-to-world (Cosmos 1, EDM Euler), Cosmos 2 video-to-world (flow matching, the pipeline's
own preconditioning, conditioning frames overwritten in x0) and Cosmos 2.5 (flow matching UniPC, the velocity
overwritten by the ground truth on the conditioning frames).

Builders use pipeline_zoo's helpers (imported as `zoo`, used inside functions only: pipeline_zoo imports this module
at its end) and cache the models with functools.cache; schedulers are made anew per pipeline (Cosmos 2 writes the last
sigma of its scheduler's table). Random prompt embeddings stand in for the T5 encoder, `_NoGuardrail` for the
guardrail (the pipelines refuse to run without a safety checker). Configs after diffusers' tests/pipelines/cosmos;
Cosmos 2.5's scheduler is the one diffusers' conversion script gives the released checkpoints (that test's default
UniPC predicts epsilon, while the pipeline hands its scheduler velocities).

No case for CosmosVideoToWorldPipeline (refused, pipelines/refusals.py): it replaces x0 by the clean conditioning
latents on its conditioning frames, while its transformer sees those frames only noise-augmented, so x0-space rules
cannot read the x0 it guides.
"""

from __future__ import annotations

import functools

import torch

import diffusers
import pipeline_zoo as zoo  # noqa: F401  (helpers: zoo._make, zoo._new, zoo._text, zoo._latent_call, ...)
from zoo_preconditioned import _NoGuardrail
from zoo_video import _video


def _transformer(in_channels: int, out_channels: int, seed: int) -> torch.nn.Module:
    return zoo._init(zoo._new(lambda: diffusers.CosmosTransformer3DModel(
        in_channels=in_channels, out_channels=out_channels, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        mlp_ratio=2, text_embed_dim=32, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=True, extra_pos_embed_type="learnable"), seed), seed + 1)


def _edm_euler() -> diffusers.EDMEulerScheduler:
    """Cosmos 1's scheduler (its model card's config)."""
    return diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80, sigma_data=0.5, sigma_schedule="karras",
                                       num_train_timesteps=1000, prediction_type="epsilon", rho=7.0,
                                       final_sigmas_type="sigma_min")


# --- Cosmos 1 text-to-world: cond and uncond calls on the same input, x0 from its EDM scheduler's step -----------
@functools.cache
def _text2world_transformer() -> torch.nn.Module:
    return _transformer(4, 4, 731)


def _text2world():
    # no VAE: output_type="latent", and the latent grid then uses the pipeline's default factors (8 and 8)
    return zoo._make("CosmosTextToWorldPipeline", transformer=_text2world_transformer(), scheduler=_edm_euler(),
                     safety_checker=_NoGuardrail())


def _text2world_kwargs() -> dict:
    return zoo._latent_call(height=32, width=32, num_frames=9, guidance_scale=3.0, **zoo._text(32, 733))


# --- Cosmos 2 video-to-world: the first latent frame is the image's, overwritten in x0 in both branches ----------
@functools.cache
def _cosmos2_video_transformer() -> torch.nn.Module:
    return _transformer(16 + 1, 16, 741)  # + 1: the condition mask channel


def _cosmos2_video():
    return zoo._make("Cosmos2VideoToWorldPipeline", transformer=_cosmos2_video_transformer(), vae=zoo._wan_vae(),
                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
                     safety_checker=_NoGuardrail())


def _cosmos2_video_kwargs() -> dict:
    return zoo._latent_call(image=_video(1, size=32, seed=743)[0], height=32, width=32, num_frames=9,
                            guidance_scale=3.0, **zoo._text(32, 744))


# --- Cosmos 2.5: the image's latent frame, its velocity replaced by the ground truth in both branches -----------
@functools.cache
def _cosmos2_5_transformer() -> torch.nn.Module:
    return _transformer(16 + 1, 16, 751)  # + 1: the condition mask channel


def _unipc_flow() -> diffusers.UniPCMultistepScheduler:
    """Cosmos 2.5's scheduler (diffusers' scripts/convert_cosmos_to_diffusers.py): flow sigmas 200/201 .. 0.01/1.01."""
    return diffusers.UniPCMultistepScheduler(use_karras_sigmas=True, use_flow_sigmas=True,
                                             prediction_type="flow_prediction", sigma_max=200.0, sigma_min=0.01)


def _cosmos2_5():
    return zoo._make("Cosmos2_5_PredictBasePipeline", transformer=_cosmos2_5_transformer(), vae=zoo._wan_vae(),
                     scheduler=_unipc_flow(), safety_checker=_NoGuardrail())


def _cosmos2_5_kwargs() -> dict:
    # one image for both prompts (Image2World): 9 frames, 3 latent frames, the first one conditioned
    return zoo._latent_call(image=_video(1, size=32, seed=753)[0], height=32, width=32, num_frames=9,
                            guidance_scale=3.0, **zoo._text(32, 754))


CASES = {
    "CosmosTextToWorldPipeline": zoo._case(_text2world, _text2world_kwargs),
    "Cosmos2VideoToWorldPipeline": zoo._case(_cosmos2_video, _cosmos2_video_kwargs),
    "Cosmos2_5_PredictBasePipeline": zoo._case(_cosmos2_5, _cosmos2_5_kwargs),
}
