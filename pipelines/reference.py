"""The reference-class branch (REF, GFCG) on text-to-image pipelines: the reference class's prompt.

On class-conditional pipelines a REF row is a conditional row with another class id. On text-to-image
pipelines it is a conditional row whose text conditioning is that of the reference class's prompt
(the strategy's `reference_prompts()`, e.g. GFCG's prompt_template over its class names): the K class
prompts are encoded once per pipeline call by the pipeline's own `encode_prompt` (its text encoders,
clip_skip and LoRA scale), and each REF row's text inputs are swapped for its class's row. Everything
else in the row (x_t, timestep, SDXL's size / crop `time_ids`, IP-Adapter embeddings) stays the
conditional row's: the same conditional input with the reference class's prompt.

Supported: Stable Diffusion and SDXL (text-to-image, img2img, inpainting), whose UNet reads the
prompt through `encoder_hidden_states` (SDXL also `added_cond_kwargs["text_embeds"]`, the pooled
embedding). ControlNet variants are not: their control residuals are computed from the target
prompt outside the UNet, so a REF row would mix the two prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

EHS, ADDED, POOLED = "encoder_hidden_states", "added_cond_kwargs", "text_embeds"


def _encode_sd(pipe, prompts: list[str], device, call: Mapping[str, Any]) -> dict[tuple[str, ...], torch.Tensor]:
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False, lora_scale=_lora_scale(call),
                                   clip_skip=call.get("clip_skip"))
    return {(EHS,): embeds}


def _encode_sdxl(pipe, prompts: list[str], device, call: Mapping[str, Any]) -> dict[tuple[str, ...], torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False, lora_scale=_lora_scale(call),
                                              clip_skip=call.get("clip_skip"))
    return {(EHS,): embeds, (ADDED, POOLED): pooled}


def _lora_scale(call: Mapping[str, Any]) -> float | None:
    attention = call.get("cross_attention_kwargs")
    return attention.get("scale") if attention is not None else None


# Pipeline class -> how its reference prompts are encoded (and which denoiser keywords they feed).
TEXT_REFERENCE: dict[str, Callable] = {
    **{name: _encode_sd for name in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                                     "StableDiffusionInpaintPipeline")},
    **{name: _encode_sdxl for name in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                                       "StableDiffusionXLInpaintPipeline")},
}


def unsupported_reason(pipe_name: str, strategy_name: str) -> str | None:
    """Why `pipe_name` cannot run a reference-class branch (None: it can, with reference prompts)."""
    if pipe_name in TEXT_REFERENCE:
        return None
    return (f"{strategy_name} needs a reference-class branch: class-conditional pipelines (the embedded "
            f"ClassConditionalPipeline, DiTPipeline) swap the class ids, and {', '.join(sorted(TEXT_REFERENCE))} "
            f"swap the prompt for the reference class's (pass class_names and prompt_template); {pipe_name} is "
            "neither")


@dataclass
class ReferencePrompts:
    """The K class prompts' text inputs to the denoiser, encoded once per call: keyword path -> (K, ...)."""

    prompts: list[str]
    inputs: dict[tuple[str, ...], torch.Tensor]

    def swap(self, kwargs: dict, rows: torch.Tensor, labels: torch.Tensor, pipe_name: str) -> dict:
        """The denoiser keywords with `rows` (conditional rows) holding the text inputs of the prompts of
        class ids `labels` (one per row); a new dict, the call's own tensors untouched."""
        k = len(self.prompts)
        bad = labels[(labels < 0) | (labels >= k)]
        if len(bad):
            raise ValueError(f"the reference class ids {sorted(set(bad.tolist()))} are out of range for the "
                             f"{k} reference prompts (class_names); allowed: class_names naming every class of "
                             "the classifier, in its label order")
        out = dict(kwargs)
        for path, table in self.inputs.items():
            parent = out
            for key in path[:-1]:  # copy the nested dicts on the way (SDXL's added_cond_kwargs)
                parent[key] = dict(parent[key])
                parent = parent[key]
            own = parent[path[-1]]
            if own.shape[1:] != table.shape[1:]:
                raise ValueError(
                    f"{pipe_name}: the call's {'.'.join(path)} are {tuple(own.shape[1:])} per row but the reference "
                    f"prompts encode to {tuple(table.shape[1:])}; allowed: prompt embeddings the pipeline's own "
                    "encode_prompt would make (pass prompts, or prompt_embeds of the same length)")
            swapped = own.clone()
            swapped[rows.to(own.device)] = table.to(own)[labels.to(table.device)].to(own.device)
            parent[path[-1]] = swapped
        return out


def encode_reference_prompts(pipe, pipe_name: str, prompts: list[str], call: Mapping[str, Any]) -> ReferencePrompts:
    """Encode the class prompts once for this call with the pipeline's own text encoders."""
    with torch.no_grad():
        inputs = TEXT_REFERENCE[pipe_name](pipe, list(prompts), pipe._execution_device, call)
    return ReferencePrompts(list(prompts), inputs)
