"""The PERTURBED branch: the pipeline's own denoiser at the conditional inputs of the rows asked, with the
strategy's perturbation active for that call only, counted in `handle.perturbed_nfe`.

"skip_blocks" (SLG, STG) skips whole transformer blocks with diffusers' block-skip hook, as
`pipelines.SkipLayerGuide` does for autoguidance (the same object, the same checks of the block stack).
"blur_queries" (SEG) blurs the self-attention queries of chosen blocks with diffusers' own SEG hook
(`hooks.smoothed_energy_guidance_utils`), placed for the perturbed call only.

"identity_attention" (PAG) makes the chosen self-attention modules' scaled-dot-product attention return the
values (the identity attention map), whatever attention processor they run, as diffusers' layer-skip machinery
does (`AttentionScoreSkipFunctionMode`, used here as is). On the joint attention of MMDiT models (SD3: image and
text tokens in one attention, a module with context projections) it perturbs, as diffusers' SD3 PAG pipelines
do (`PAGJointAttnProcessor2_0`), only the image-to-image block: each image token attends to itself and to the
text, the text tokens attend as usual (diffusers' `PerturbedAttentionGuidance` guider instead makes the whole
joint map the identity). The modules are chosen as diffusers' PAG pipelines choose them from
`pag_applied_layers` (`PAGMixin._set_pag_attn_processor`): a self-attention module whose name the pattern is
found in. Those pipelines swap in processors that split a batch [uncond; cond; perturbed] by position, which a
batch of only the rows asked cannot use; hooks on the modules work on any rows.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks._common import _ATTENTION_CLASSES
from diffusers.hooks.layer_skip import AttentionScoreSkipFunctionMode
from diffusers.hooks.smoothed_energy_guidance_utils import (SmoothedEnergyGuidanceConfig,
                                                           _apply_smoothed_energy_guidance_hook)

from guidance.base import PERTURBED, Perturbation

from ..layouts.base import DenoiserCall
from ..skip_layer import SkipLayerGuide
from .base import ConditionalRowsBranch

if TYPE_CHECKING:
    from ..hook import GuidanceHandle

HOOK_NAME = "guidance_kit_perturbed"
SEG_HOOK_NAME = "guidance_kit_seg"


def self_attention_modules(denoiser: torch.nn.Module, patterns: tuple[str, ...], pipe_name: str) -> list:
    """The self-attention modules each pattern is found in (diffusers' `pag_applied_layers` rule, including its
    check that a pattern ending in a number is not matched by a module name ending in that same number)."""
    def integral_clash(pattern: str, name: str) -> bool:
        last_p, last_n = pattern.split(".")[-1], name.split(".")[-1]
        return last_p.isnumeric() and last_n.isnumeric() and last_p == last_n

    found = []
    for pattern in patterns:
        hits = [m for name, m in denoiser.named_modules()
                if isinstance(m, _ATTENTION_CLASSES) and not getattr(m, "is_cross_attention", False)
                and re.search(pattern, name) is not None and not integral_clash(pattern, name)]
        if not hits:
            raise ValueError(f"{pipe_name}: layers pattern {pattern!r} matches no self-attention module of its "
                             f"{type(denoiser).__name__}; allowed: a pattern found in a self-attention module's name "
                             "(e.g. 'mid', 'down_blocks.1', 'transformer_blocks.0')")
        found += [m for m in hits if all(m is not f for f in found)]
    return found


class _ImageBlockIdentity(torch.overrides.TorchFunctionMode):
    """Inside one joint attention: the image-to-image block of the attention map made the identity (a mask of
    -inf off its diagonal), the rest left as it is. SD3 puts the image tokens first, Flux's double blocks last."""

    def __init__(self, image_tokens: int, image_first: bool):
        super().__init__()
        self.n, self.image_first = image_tokens, image_first

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query = kwargs.get("query", args[0] if args else None)
        length = query.shape[-2]
        block = slice(0, self.n) if self.image_first else slice(length - self.n, length)
        mask = torch.zeros(length, length, device=query.device, dtype=query.dtype)
        mask[block, block] = float("-inf")
        mask[block, block].fill_diagonal_(0.0)
        given = kwargs.pop("attn_mask", args[3] if len(args) > 3 else None)
        args = args[:3]
        kwargs["attn_mask"] = mask if given is None else given + mask
        return func(*args, **kwargs)


class _IdentityAttentionHook(ModelHook):
    """PAG's perturbation on one self-attention module, for the calls made while it is registered."""

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if context is None or getattr(module, "add_q_proj", None) is None:
            with AttentionScoreSkipFunctionMode():  # plain self-attention: the whole map is the identity
                return self.fn_ref.original_forward(*args, **kwargs)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        image_first = "Joint" in type(getattr(module, "processor", None)).__name__  # SD3's JointAttnProcessor
        with _ImageBlockIdentity(hidden.shape[1], image_first):
            return self.fn_ref.original_forward(*args, **kwargs)


class Perturber:
    """One perturbation of one denoiser, checked when made (a pattern matching nothing, an unknown block stack
    or out-of-range indices are refused by name), active inside `with perturber.active():` only."""

    def __init__(self, denoiser: torch.nn.Module, perturbation: Perturbation, pipe_name: str):
        self.denoiser, self.perturbation, self.pipe_name = denoiser, perturbation, pipe_name
        if perturbation.kind == "skip_blocks":
            self.skip = SkipLayerGuide([int(i) for i in perturbation.layers], perturbation.blocks)
            self.skip.stack(denoiser, pipe_name)
        elif perturbation.kind == "blur_queries":
            try:  # placed and removed once: diffusers' own checks of the stack and indices
                with self._blurred():
                    pass
            except (ValueError, TypeError) as e:  # diffusers raises TypeError for a stack name it cannot find
                raise ValueError(f"{pipe_name}: SEG's blocks={perturbation.blocks!r}, layers="
                                 f"{list(perturbation.layers)} cannot be found in its {type(denoiser).__name__}: "
                                 f"{e}") from e
        else:
            self.targets = self_attention_modules(denoiser, perturbation.layers, pipe_name)

    @contextmanager
    def _blurred(self):
        """diffusers' SEG hooks on the query projections of the chosen blocks, inside the `with` only."""
        p = self.perturbation
        config = SmoothedEnergyGuidanceConfig([int(i) for i in p.layers], fqn=p.blocks or "auto")
        try:
            _apply_smoothed_energy_guidance_hook(self.denoiser, config, p.sigma, name=SEG_HOOK_NAME)
            yield
        finally:
            HookRegistry.check_if_exists_or_initialize(self.denoiser).remove_hook(SEG_HOOK_NAME, recurse=True)

    @contextmanager
    def _identity_attention(self):
        try:
            for module in self.targets:
                HookRegistry.check_if_exists_or_initialize(module).register_hook(_IdentityAttentionHook(), HOOK_NAME)
            yield
        finally:
            for module in self.targets:
                registry = HookRegistry.check_if_exists_or_initialize(module)
                if registry.get_hook(HOOK_NAME) is not None:
                    registry.remove_hook(HOOK_NAME, recurse=False)

    def active(self):
        """The perturbation in place for the denoiser calls made inside the `with`."""
        kind = self.perturbation.kind
        if kind == "skip_blocks":
            return self.skip.skipping(self.denoiser, self.pipe_name)
        return self._blurred() if kind == "blur_queries" else self._identity_attention()


class PerturbedBranch(ConditionalRowsBranch):
    name = PERTURBED

    def __init__(self, handle: "GuidanceHandle", perturbation: Perturbation):
        super().__init__(handle)
        self.perturbation = perturbation
        # Checked now, so that apply_guidance refuses what cannot be perturbed, not the first step.
        self.perturbers = [Perturber(d, perturbation, handle.pipe_name) for d in handle.denoisers]

    def forward(self, call: DenoiserCall) -> Callable:
        perturber = self.perturbers[call.expert]

        def perturbed_forward(*args, **kwargs):
            with perturber.active():
                return call.forward(*args, **kwargs)

        return perturbed_forward
