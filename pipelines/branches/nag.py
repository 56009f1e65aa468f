"""NAG on the conditional pass (guidance/nag.py): not a branch of its own but the pipeline's conditional rows run
with normalized attention guidance in their joint-attention layers, in the same denoiser call.

The layouts hand the conditional rows of each call they run (`DenoiserCall.run(cond_rows=...)`); for the rows
whose samples NAG guides at this step (R), `NAGConditional.bind` runs the call with |R| extra rows appended: the
same latents with the negative prompt's text tokens (its own text stream through every block, as in the authors'
pipelines), and, for the time embedding, the negative prompt's pooled embedding on Flux (their Flux pipeline) or
the prompt's own on SD3 (their SD3 pipeline). Hooks placed for that call only (plain torch hooks, removed after):

- each dual-stream block (and Flux's first single-stream block) gets the extra rows' image tokens reset to their
  conditional row's, and its image AdaLN the conditional row's time embedding, so the image tokens are one stream
  whose keys / values both text streams see (the authors tile the image queries / keys / values inside their
  attention processor and truncate the image stream's time embedding, `TruncAdaLayerNormZero`: the same numbers);
- each chosen joint-attention module's output projection (`to_out[0]`) gets, in place of the conditional rows'
  image attention output Z+, `nag_attention(Z+, Z-)` with Z- the extra rows' output;
- Flux's single-stream attention (no output projection: it feeds `proj_out` with the MLP) gets the same on its
  image tokens, written to both rows, and its extra rows then run on (the authors' Flux transformer tiles the
  joint stream once before the single blocks).

The extra rows' outputs are dropped; the call returns the pipeline's own rows. Refused by name: denoisers other
than Flux's and SD3's transformers, and calls with ControlNet residuals, IP-Adapter embeddings or SD3's
skip_layers (their inputs have no rows for the negative stream).
"""

from __future__ import annotations

import inspect
import re
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from guidance.nag import NAG, nag_attention

from ..layouts.rows import first, replace_first

if TYPE_CHECKING:
    from ..hook import GuidanceHandle

# Pipeline classes NAG is tested on -> the family of their transformer.
PIPELINES = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}
TRANSFORMERS = {"flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel"}
# Denoiser keywords whose inputs would need rows for the negative stream that nobody makes.
REFUSED_KWS = ("controlnet_block_samples", "controlnet_single_block_samples", "block_controlnet_hidden_states",
               "skip_layers")


def refusal(pipe_name: str, denoiser: torch.nn.Module) -> str | None:
    """Why NAG cannot run on this pipeline (None: it can)."""
    family = PIPELINES.get(pipe_name)
    if family is None:
        return (f"NAG runs on {', '.join(sorted(PIPELINES))} (Flux and SD3 joint-attention transformers); "
                f"{pipe_name} is not one of them")
    if type(denoiser).__name__ != TRANSFORMERS[family]:
        return f"NAG on {pipe_name} needs its {TRANSFORMERS[family]}; it has a {type(denoiser).__name__}"
    return None


class NAGConditional:
    """The NAG conditional pass of one pipeline: checked when made, encoded once per call, bound per denoiser call."""

    def __init__(self, handle: "GuidanceHandle", node: NAG, is_root: bool):
        self.handle, self.node = handle, node
        denoiser = handle.denoiser
        reason = refusal(handle.pipe_name, denoiser)
        if reason is not None:
            raise NotImplementedError(reason)
        if not is_root:
            raise ValueError(f"NAG inside {type(handle.strategy).__name__}: NAG must be the outermost strategy (its "
                             "step window is nag_end; a rule on its prediction goes in NAG(inner=...))")
        self.family = PIPELINES[handle.pipe_name]
        self.signature = inspect.signature(type(denoiser).forward)
        patterns = node.layers if node.layers is not None else [""]
        joint, single = [], []
        for name, module in denoiser.named_modules():
            if not hasattr(module, "to_q") or not any(re.search(p, name) for p in patterns):
                continue
            if getattr(module, "add_k_proj", None) is not None and hasattr(module, "to_out"):
                joint.append(module)  # joint text + image attention: NAG before its image output projection
            elif name.startswith("single_transformer_blocks.") and self.family == "flux":
                single.append(module)  # Flux's single-stream attention over [text; image] tokens
        if not joint and not single:
            raise ValueError(f"NAG: layers={node.layers!r} match no joint-attention module of {handle.pipe_name}'s "
                             f"{type(denoiser).__name__}; allowed: None (every one) or patterns found in their names, "
                             "e.g. 'transformer_blocks.0'")
        self.joint, self.single = joint, single
        # The blocks whose extra rows take their conditional row's image tokens on entry.
        self.dual = list(denoiser.transformer_blocks)
        self.retile = list(self.dual)
        if self.family == "flux" and len(denoiser.single_transformer_blocks):
            self.retile.append(denoiser.single_transformer_blocks[0])
        self.negative: dict[str, torch.Tensor] | None = None
        self.rows_run: torch.Tensor | None = None  # per sample: steps whose conditional pass ran with NAG

    # --- per call -------------------------------------------------------------------------------------------
    def start_call(self, pipe, call: Mapping[str, Any]) -> None:
        """Encode the negative prompt with the pipeline's own encoders (its max_sequence_length, clip_skip, LoRA
        scale), once for the call."""
        attention = call.get("joint_attention_kwargs") or {}
        if "ip_adapter_image_embeds" in attention or call.get("ip_adapter_image") is not None \
                or call.get("ip_adapter_image_embeds") is not None:
            raise NotImplementedError(f"NAG on {type(pipe).__name__}: an IP-Adapter image has no rows for the "
                                      "negative prompt's stream; call without ip_adapter_image")
        common = dict(device=pipe._execution_device, num_images_per_prompt=1, lora_scale=attention.get("scale"))
        if call.get("max_sequence_length") is not None:
            common["max_sequence_length"] = call["max_sequence_length"]
        prompt = self.node.negative_prompt
        with torch.no_grad():
            if self.family == "flux":
                embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, **common)
            else:
                embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None,
                                                          do_classifier_free_guidance=False,
                                                          clip_skip=call.get("clip_skip"), **common)
        self.negative = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        self.rows_run = None

    # --- per denoiser call ------------------------------------------------------------------------------------
    def bind(self, forward: Callable, cond_rows: torch.Tensor) -> Callable:
        """`forward` with NAG on the conditional rows `cond_rows` (positions in its batch, in sample order) of the
        samples NAG guides at this step."""
        active = self.node.active(self.handle.call.ctx).cpu()
        counted = active.long()
        self.rows_run = counted if self.rows_run is None else self.rows_run + counted
        rows = cond_rows.cpu()[active]
        if not len(rows):
            return forward

        def nag_forward(*args, **kwargs):
            bound = self.signature.bind(None, *args, **kwargs)
            kw = {k: v for k, v in bound.arguments.items() if k != "self"}
            kw.update(kw.pop("kwargs", {}))
            return self._run(forward, kw, rows)

        return nag_forward

    def _run(self, forward: Callable, kw: dict, rows: torch.Tensor):
        name = self.handle.pipe_name
        for key in REFUSED_KWS:
            if kw.get(key) is not None:
                raise NotImplementedError(f"NAG on {name}: the denoiser got {key}, which has no rows for the negative "
                                          "prompt's stream; call without it")
        if "ip_adapter_image_embeds" in (kw.get("joint_attention_kwargs") or {}):
            raise NotImplementedError(f"NAG on {name}: an IP-Adapter image has no rows for the negative prompt's "
                                      "stream; call without ip_adapter_image")
        x = kw["hidden_states"]
        n, device = x.shape[0], x.device
        idx = rows.to(device)
        context = kw["encoder_hidden_states"]
        negative = self.negative["encoder_hidden_states"].to(device, context.dtype)
        if negative.shape[1:] != context.shape[1:]:
            raise ValueError(f"NAG on {name}: the negative prompt encodes to {tuple(negative.shape[1:])} text features "
                             f"but the call's prompt embeddings are {tuple(context.shape[1:])}; allowed: prompt "
                             "embeddings of the pipeline's own length (max_sequence_length)")
        extra = len(rows)

        def rows_of(value):
            if torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == n:
                return torch.cat([value, value[idx]])
            return value  # a scalar timestep, ids without a batch: shared by every row

        ext = dict(kw)
        ext["hidden_states"] = torch.cat([x, x[idx]])
        ext["encoder_hidden_states"] = torch.cat([context, negative.expand(extra, *negative.shape[1:])])
        for key in ("timestep", "guidance"):
            if key in ext:
                ext[key] = rows_of(ext[key])
        pooled = kw.get("pooled_projections")
        if pooled is not None:
            if self.family == "flux":  # the authors' Flux pipeline: the negative prompt's pooled embedding
                neg_pooled = self.negative["pooled_projections"].to(device, pooled.dtype)
                ext["pooled_projections"] = torch.cat([pooled, neg_pooled.expand(extra, *neg_pooled.shape[1:])])
            else:  # their SD3 pipeline: the prompt's own
                ext["pooled_projections"] = rows_of(pooled)
        with self._hooks(n, idx, context.shape[1]):
            out = forward(**ext)
        return replace_first(out, first(out)[:n])

    @contextmanager
    def _hooks(self, n: int, idx: torch.Tensor, text_len: int):
        node = self.node
        mix = dict(scale=node.nag_scale, tau=node.nag_tau, alpha=node.nag_alpha, norm=node.norm)

        def retile(module, args, kwargs):
            if "hidden_states" in kwargs:
                h = kwargs["hidden_states"]
                return args, {**kwargs, "hidden_states": torch.cat([h[:n], h[idx]])}
            h = args[0]
            return (torch.cat([h[:n], h[idx]]),) + tuple(args[1:]), kwargs

        def image_modulation(module, args, kwargs):  # the image stream's AdaLN: the conditional rows' embedding
            emb = kwargs["emb"]
            return args, {**kwargs, "emb": torch.cat([emb[:n], emb[idx]])}

        def joint_output(module, args):
            z = args[0]
            out = z.clone()
            out[idx] = nag_attention(z[idx], z[n:], **mix)
            return (out,) + tuple(args[1:])

        def single_output(module, args, output):
            z = output[:, text_len:]
            guided = nag_attention(z[idx], z[n:], **mix)
            out = output.clone()
            out[idx, text_len:] = guided
            out[n:, text_len:] = guided
            return out

        handles = []
        try:
            handles += [b.register_forward_pre_hook(retile, with_kwargs=True) for b in self.retile]
            handles += [b.norm1.register_forward_pre_hook(image_modulation, with_kwargs=True) for b in self.dual]
            handles += [m.to_out[0].register_forward_pre_hook(joint_output) for m in self.joint]
            handles += [m.register_forward_hook(single_output) for m in self.single]
            yield
        finally:
            for h in handles:
                h.remove()
