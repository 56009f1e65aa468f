"""Tiny LongCat-AudioDiT and PRX Pixel pipelines, for tests/test_pipeline_zoo.py and tests/test_audio_pixel.py.

- LongCatAudioDiTPipeline: (B, T, C) audio latents, a conditional then an unconditional transformer call per step
  (no cache context), FlowMatch Euler with invert_sigmas (its table holds the data fraction; the transformer
  predicts x0 - eps), a tiny UMT5 encoder with the offline T5-style tokenizer.
- PRXPixelPipeline: RGB pixels, batched [uncond; cond], a transformer predicting x0 that the pipeline turns into
  the velocity (x - x0) / max(t, 0.05) after its CFG. One prompt: diffusers 0.42.1 builds its CFG timestep as
  .repeat(2) (2 rows, not 2 x batch), as in PRXPipeline. Its 3 steps run at sigma 1, 0.5005 and 0.001: the last
  one in the clamp (t_x = 0.05 there, so the x0 it steps with is 0.98 x + 0.02 x0_pred).

Builders use pipeline_zoo's helpers (imported as `zoo`, used inside functions only: pipeline_zoo imports this module
at its end); models are cached, schedulers made anew per pipeline.
"""

from __future__ import annotations

import functools

import diffusers
import pipeline_zoo as zoo  # noqa: F401  (helpers: zoo._make, zoo._new, zoo._init, zoo._text, ...)


# --- LongCat-AudioDiT -----------------------------------------------------------------------------------------
@functools.cache
def _longcat_audio_models() -> dict:
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = zoo.tp.t5_tokenizer()
    text_encoder = zoo._new(lambda: UMT5EncoderModel(UMT5Config(
        d_model=32, num_layers=1, num_heads=4, d_ff=64, vocab_size=len(tokenizer))), 801)
    # _init: the transformer's zero-initialised output layers would make both branches equal
    transformer = zoo._init(zoo._new(lambda: diffusers.LongCatAudioDiTTransformer(
        dit_dim=32, dit_depth=2, dit_heads=4, dit_text_dim=32, latent_dim=8, text_conv=False), 802), 803)
    # sample_rate 16, downsampling 2: audio_duration_s=2.0 makes 16 latent frames (decoded only for output_type="pt")
    vae = zoo._new(lambda: diffusers.LongCatAudioDiTVae(
        in_channels=1, channels=16, c_mults=[1, 2], strides=[2], latent_dim=8, encoder_latent_dim=16,
        downsampling_ratio=2, sample_rate=16), 804)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae)


def _longcat_audio():
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, invert_sigmas=True)  # the pipeline's default
    return zoo._make("LongCatAudioDiTPipeline", scheduler=scheduler, **_longcat_audio_models())


def _longcat_audio_kwargs() -> dict:
    return dict(prompt=list(zoo.tp.PROMPTS), audio_duration_s=2.0, num_inference_steps=zoo.STEPS, guidance_scale=4.0,
                output_type="latent")


# --- PRX Pixel ------------------------------------------------------------------------------------------------
@functools.cache
def _prx_pixel_transformer():
    return zoo._init(zoo._new(lambda: diffusers.PRXTransformer2DModel(
        patch_size=1, in_channels=3, context_in_dim=8, hidden_size=8, mlp_ratio=2.0, num_heads=2, depth=1,
        axes_dim=[2, 2], bottleneck_size=8, resolution_embeds=True), 811), 812)


def _prx_pixel():
    return zoo._make("PRXPixelPipeline", transformer=_prx_pixel_transformer(),
                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


def _prx_pixel_kwargs() -> dict:
    text = {k: v[:1] for k, v in zoo._text(8, 813, mask="prompt_attention_mask").items()}
    text = {k: v.bool() if "mask" in k else v for k, v in text.items()}
    return zoo._latent_call(height=32, width=32, guidance_scale=4.0, use_resolution_binning=False, **text)


CASES = {
    "LongCatAudioDiTPipeline": zoo._case(_longcat_audio, _longcat_audio_kwargs),
    "PRXPixelPipeline": zoo._case(_prx_pixel, _prx_pixel_kwargs),
}
