"""Tiny Cosmos world pipelines for tests/test_pipeline_zoo.py (rows in pipelines/adapters.py's "Cosmos world
pipelines" block): text-to-world (Cosmos 1, EDM Euler) and Cosmos 2 video-to-world (flow matching, the pipeline's
own preconditioning, conditioning frames overwritten in x0).

Builders use pipeline_zoo's helpers (imported as `zoo`, used inside functions only: pipeline_zoo imports this module
at its end) and cache the models with functools.cache; schedulers are made anew per pipeline (Cosmos 2 writes the last
sigma of its scheduler's table). Random prompt embeddings stand in for the T5 encoder, `_NoGuardrail` for the
guardrail (the pipelines refuse to run without a safety checker). Configs after diffusers' tests/pipelines/cosmos.

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


CASES = {
    "CosmosTextToWorldPipeline": zoo._case(_text2world, _text2world_kwargs),
    "Cosmos2VideoToWorldPipeline": zoo._case(_cosmos2_video, _cosmos2_video_kwargs),
}
