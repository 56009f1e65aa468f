"""Tiny pipelines of more image transformers for tests/test_pipeline_zoo.py (rows in pipelines/adapters.py's
"more image transformers" block).

Builders use pipeline_zoo's helpers (imported as `zoo`, used inside functions only: pipeline_zoo imports
this module at its end) and cache shared components with functools.cache.
"""

from __future__ import annotations

import functools

import torch

import diffusers
import pipeline_zoo as zoo  # noqa: F401  (helpers: zoo._make, zoo._new, zoo._text, zoo._latent_call, ...)


# --- Krea 2 (two calls per step without a cache context, cond first; c + s (c - u), CFG on when s > 0) ---------
@functools.cache
def _krea2_parts() -> dict:
    transformer = zoo._init(diffusers.Krea2Transformer2DModel(  # 4 latent channels packed 2 x 2
        in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3, text_num_attention_heads=2,
        text_num_key_value_heads=1, text_intermediate_size=16, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
        axes_dims_rope=(4, 2, 2)), 421)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                          base_image_seq_len=256, max_image_seq_len=6400)
    return dict(transformer=transformer, scheduler=scheduler)


def _krea2_kwargs() -> dict:
    # prompt embeddings: (batch, text_len, num_text_layers, text_hidden_dim) with bool masks
    kw = {}
    for prefix, seed in (("", 423), ("negative_", 424)):
        kw[f"{prefix}prompt_embeds"] = zoo._embeds(zoo.BATCH, 8, 3, 16, seed=seed)
        mask = torch.ones(zoo.BATCH, 8, dtype=torch.bool)
        mask[1, 6:] = False  # one padded prompt
        kw[f"{prefix}prompt_embeds_mask"] = mask
    return zoo._latent_call(height=32, width=32, guidance_scale=3.0, **kw)


# --- Bria Fibo 2.0 (two calls per step without a cache context, cond first; u + s (c - u), CFG on when s > 1) ----
@functools.cache
def _fibo2_parts() -> dict:
    transformer = zoo._init(diffusers.BriaFibo2Transformer2DModel(  # 4 latent channels, 2 x 2 patches inside
        in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=16,
        injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4,
        gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(16, 16, 16)), 431)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                          base_image_seq_len=256, max_image_seq_len=4096)
    return dict(transformer=transformer, scheduler=scheduler)


def _fibo2_kwargs() -> dict:
    # prompt embeddings: (batch, 1 + len(injection_layer_ids), text_len, cap_feat_dim) with bool masks; the negative
    # ones have their own length (the pipeline runs them in their own call)
    kw = {}
    for prefix, length, seed in (("", 8, 433), ("negative_", 6, 434)):
        kw[f"{prefix}prompt_embeds"] = zoo._embeds(zoo.BATCH, 2, length, 16, seed=seed)
        mask = torch.ones(zoo.BATCH, length, dtype=torch.bool)
        mask[1, length - 2:] = False  # one padded prompt
        kw[f"{prefix}prompt_embeds_mask"] = mask
    return zoo._latent_call(height=32, width=48, guidance_scale=3.0, **kw)


CASES: dict = {
    "Krea2Pipeline": zoo._case(lambda: zoo._make("Krea2Pipeline", **_krea2_parts()), _krea2_kwargs),
    "BriaFibo2Pipeline": zoo._case(lambda: zoo._make("BriaFibo2Pipeline", **_fibo2_parts()), _fibo2_kwargs),
}
