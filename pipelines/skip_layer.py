"""A guide model for autoguidance where no second model exists: the pipeline's own denoiser with some of
its transformer blocks skipped, during the guide evaluation only.

    with apply_guidance(pipe, Autoguidance(), guide_model=SkipLayerGuide([7, 8, 9])) as handle:
        images = pipe(prompt, guidance_scale=3.0).images
    # or, in a config: Autoguidance(guide_model="skip-layers:7,8,9")

AN APPROXIMATION OF AUTOGUIDANCE. The paper [P: Karras et al. 2024, arXiv 2406.02507, abstract] guides
with a separately trained, smaller and/or less-trained version of the model; it skips no layers. Skipping
blocks of the main model to make its "bad version" is what diffusers' `AutoGuidance` guider (layer-skip
hooks during its unconditional pass) and Stability's skip-layer guidance (SLG, SD3.5: blocks 7, 8, 9 of
SD3.5 Medium skipped in an extra conditional pass) do [O: diffusers 0.42.1 guiders/auto_guidance.py,
guiders/skip_layer_guidance.py, transformer_sd3.py `skip_layers`]. That a block-skipped denoiser degrades
in the way autoguidance needs (errors of the same kind as the main model's, only larger) is OUR READING,
not a result of the paper; which blocks to skip is model-specific and untested here (SLG's 7, 8, 9 for
SD3.5 Medium is Stability's recommendation). Used with `Autoguidance(mix=1)`, the rule is
`D_skip + w (D - D_skip)`: SLG's difference `D - D_skip` alone, with no CFG term; `mix` < 1 adds CFG as
for any guide model. SD3's built-in SLG, `u + s (c - u) + s_slg (c - c_skip)`, is
`Autoguidance(scale=s + s_slg, mix=s_slg / (s + s_slg - 1))` with this guide (algebra; tested against the
pipeline's own SLG to 1e-5 on a tiny SD3, with its step window opened to every step; SLG's window, CFG
alone outside it, is not one strategy here: `Interval` gives the conditional prediction outside its
window).

What is skipped: whole transformer blocks (attention and feed-forward together; each skipped block passes
its inputs through unchanged), of one stack of the denoiser (`FAMILIES`): `transformer_blocks` for DiT,
SD3, Flux (whose single-stream stack is `blocks="single_transformer_blocks"`), Qwen-Image, CogView4 and the
video transformers of LTX, CogVideoX, HunyuanVideo (and its single-stream stack) and Mochi; `blocks` for Wan.
Other denoisers are refused by name. The skipping is diffusers' layer-skip hook (`TransformerBlockSkipHook`,
installed through the hook registry, as its guiders do), registered on the skipped blocks just before the
guide rows run and removed right after, exceptions included: the conditional and unconditional passes run
the full model.

Cost: the guide rows are a full evaluation of the main model's cost (minus the skipped blocks), counted in
`handle.guide_nfe` like a separate guide model's rows.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.layer_skip import TransformerBlockSkipHook

SKIP_HOOK_NAME = "guidance_kit_skip_layer"
NAME_PREFIX = "skip-layers:"

# Denoiser class -> the block stacks that may be skipped (the first is the default). Each stack's blocks are
# registered in diffusers' TransformerBlockRegistry (which says what a block returns).
FAMILIES: dict[str, tuple[str, ...]] = {
    "DiTTransformer2DModel": ("transformer_blocks",),
    "Transformer2DModel": ("transformer_blocks",),  # DiT checkpoints saved before DiTTransformer2DModel
    "SD3Transformer2DModel": ("transformer_blocks",),
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "QwenImageTransformer2DModel": ("transformer_blocks",),
    "CogView4Transformer2DModel": ("transformer_blocks",),
    # video transformers (STG: the same skip on a video model's blocks)
    "WanTransformer3DModel": ("blocks",),
    "LTXVideoTransformer3DModel": ("transformer_blocks",),
    "CogVideoXTransformer3DModel": ("transformer_blocks",),
    "HunyuanVideoTransformer3DModel": ("transformer_blocks", "single_transformer_blocks"),
    "MochiTransformer3DModel": ("transformer_blocks",),
}


class _OrderedBlockSkipHook(TransformerBlockSkipHook):
    """diffusers' whole-block skip, its outputs in the block's own order.

    Why not diffusers' hook as is: in diffusers 0.42.1 `TransformerBlockSkipHook` returns
    `(hidden_states, encoder_hidden_states)` whatever the block returns, but SD3's `JointTransformerBlock`
    and Flux's blocks return `(encoder_hidden_states, hidden_states)` (the registry's
    `return_*_index` say so), so a skipped block would swap the image and text streams (a shape error, or
    silently wrong when both have the same length; tests/test_skip_layer_guide.py keeps a check that fails
    once diffusers fixes it). Blocks that return hidden states only (DiT) behave exactly as diffusers'."""

    def __init__(self):
        super().__init__(dropout=1.0)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        meta = self._metadata
        hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
        if meta.return_encoder_hidden_states_index is None:
            return hidden
        out = [None, None]
        out[meta.return_hidden_states_index] = hidden
        out[meta.return_encoder_hidden_states_index] = meta._get_parameter_from_args_kwargs(
            meta.encoder_hidden_states_argument_name, args, kwargs)
        return tuple(out)


class SkipLayerGuide:
    """The pipeline's denoiser with blocks `layers` of stack `blocks` skipped: a guide model for
    `Autoguidance` (pass it as `apply_guidance(..., guide_model=SkipLayerGuide([...]))`, or name it
    `"skip-layers:7,8"` / `"skip-layers:single_transformer_blocks:3,4"`). An approximation of autoguidance:
    see the module docstring. layers=[] skips nothing (the guide is then the conditional model)."""

    def __init__(self, layers: Sequence[int], blocks: str | None = None):
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise ValueError(f"SkipLayerGuide: layers={layers!r}; allowed: a list of block indices (ints >= 0)")
        if len(set(layers)) != len(layers):
            raise ValueError(f"SkipLayerGuide: layers={list(layers)} repeats an index; allowed: distinct indices")
        if blocks is not None and not isinstance(blocks, str):
            raise ValueError(f"SkipLayerGuide: blocks={blocks!r}; allowed: None (the denoiser's main block stack) "
                             "or a block stack's name such as 'transformer_blocks'")
        self.layers = sorted(layers)
        self.blocks = blocks

    @classmethod
    def from_name(cls, name: str) -> "SkipLayerGuide":
        """"skip-layers:7,8" (the default stack) or "skip-layers:<stack>:7,8"; "skip-layers:" skips nothing."""
        spec = name[len(NAME_PREFIX):] if name.startswith(NAME_PREFIX) else None
        blocks, _, indices = (spec or "").rpartition(":")
        try:
            if spec is None:
                raise ValueError
            layers = [int(i) for i in indices.split(",")] if indices.strip() else []
        except ValueError:
            raise ValueError(f"guide_model={name!r}; allowed: 'skip-layers:<i>,<j>,...' or "
                             "'skip-layers:<block stack>:<i>,<j>,...' (e.g. 'skip-layers:7,8,9')") from None
        return cls(layers, blocks or None)

    def __repr__(self) -> str:
        return f"SkipLayerGuide(layers={self.layers}, blocks={self.blocks!r})"

    # --- checks ------------------------------------------------------------------------------------------
    def stack(self, denoiser: torch.nn.Module, pipe_name: str) -> torch.nn.ModuleList:
        """The block stack to skip in, checked: a supported family, a known stack, indices in range."""
        family = type(denoiser).__name__
        if family not in FAMILIES:
            raise ValueError(f"SkipLayerGuide: {pipe_name}'s denoiser is a {family}; allowed: "
                             f"{', '.join(FAMILIES)} (transformers whose block stacks are known)")
        blocks = self.blocks or FAMILIES[family][0]
        if blocks not in FAMILIES[family]:
            raise ValueError(f"SkipLayerGuide: blocks={blocks!r} is not a block stack of {family}; allowed: "
                             f"{', '.join(repr(b) for b in FAMILIES[family])}")
        stack = getattr(denoiser, blocks)
        bad = [i for i in self.layers if i >= len(stack)]
        if bad:
            raise ValueError(f"SkipLayerGuide: layers={bad} out of range for {family}.{blocks}; allowed: indices "
                             f"0..{len(stack) - 1} ({len(stack)} blocks)")
        return stack

    # --- the guide evaluation ----------------------------------------------------------------------------
    @contextmanager
    def skipping(self, denoiser: torch.nn.Module, pipe_name: str):
        """Blocks `layers` skipped inside the `with` only; the hooks are removed on the way out, exceptions
        included (removed one by one, so a failure while registering leaves none behind either)."""
        stack = self.stack(denoiser, pipe_name)
        registries = []
        try:
            for i in self.layers:
                registry = HookRegistry.check_if_exists_or_initialize(stack[i])
                registries.append(registry)
                registry.register_hook(_OrderedBlockSkipHook(), SKIP_HOOK_NAME)
            yield
        finally:
            for registry in registries:
                registry.remove_hook(SKIP_HOOK_NAME, recurse=False)

    def bind(self, denoiser: torch.nn.Module, forward: Callable, pipe_name: str) -> Callable:
        """What evaluates the GUIDE rows: `forward` (the denoiser's forward below the guidance hook, so the
        guide call is not guided itself) with the blocks skipped around that one call."""
        def guide_forward(*args, **kwargs):
            with self.skipping(denoiser, pipe_name):
                return forward(*args, **kwargs)
        return guide_forward


def active_skip_hooks(denoiser: torch.nn.Module) -> list[str]:
    """Names of the submodules of `denoiser` that hold a skip hook of ours right now (empty between guide
    evaluations)."""
    return [name for name, m in denoiser.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.get_hook(SKIP_HOOK_NAME)]
