"""The refusals of a guided pipeline call, apart from the hook that raises them.

Before any step (`check_call`, `reference_prompts`), at each step (`step_masks`: the branches the strategy asks for
against those this pipeline provides) and after the call (`check_finite`). Functions of the handle's adapter,
strategy and pipeline name and of the call, so that each refusal and its message live in one place and the handle
keeps only installation and per-call state.
"""

from __future__ import annotations

import torch

from guidance.base import COND, GUIDE, PERTURBED, REF, UNCOND, GuidanceStrategy, StepContext, is_finite_number

from .adapters import Adapter
from .call_state import CallState
from .reference import unsupported_reason


def needs_reference(strategy: GuidanceStrategy) -> bool:
    """Whether the strategy (or one it wraps) may ask for a REF branch (defines reference_labels)."""
    if type(strategy).reference_labels is not GuidanceStrategy.reference_labels:
        return True
    return any(needs_reference(child) for child in strategy.wrapped_strategies())


def reference_prompts(strategy: GuidanceStrategy, pipe_name: str) -> list[str]:
    """The prompt of each reference class id, from the strategy (text-to-image pipelines)."""
    prompts = getattr(strategy, "reference_prompts", lambda: None)()
    if not prompts:
        name = type(strategy).__name__
        raise ValueError(f"{name}: {pipe_name} has no class ids, so the reference-class branch needs the "
                         f"reference class's prompt; pass prompt_template (e.g. 'a photo of a {{}}') and "
                         f"class_names (or a classifier with class names) to {name}")
    return list(prompts)


def check_call(a: Adapter, strategy: GuidanceStrategy, pipe_name: str, call: dict, scales: list, *,
               sequential: bool, denoisers: int) -> bool:
    """Refuse, before any step runs, a call in which the pipeline runs no unconditional branch
    or which the strategy cannot guide here. Returns whether the pipeline runs its unconditional branch.

    `scales`: the call's scale per denoiser; `sequential`: the pipeline's layout makes cond and uncond two calls;
    `denoisers`: how many denoisers the pipeline has."""
    name = type(strategy).__name__
    for kw, s in zip((a.scale_kw,) + a.expert_scale_kws, scales):
        if s is not None and not is_finite_number(s):
            raise ValueError(f"{pipe_name} was called with {kw}={s!r}; allowed: a finite number "
                             f"(> {a.on_above:g} turns the pipeline's unconditional branch on)")
    on = scales[0] is not None and scales[0] > a.on_above
    if a.denoisers_in_turn:  # unCLIP runs CFG in every stage when any stage's scale is on
        on = any(s is not None and s > a.on_above for s in scales)
    if a.needs_negative:
        on = on and (call.get("negative_prompt") is not None or call.get("negative_prompt_embeds") is not None)
    if not on and getattr(strategy, "requires_uncond", True):
        raise ValueError(
            f"{pipe_name} was called with {a.scale_kw}={scales[0]!r}, so it runs no "
            f"unconditional branch and {name} cannot guide; {a.enable_hint}"
        )
    for kw in a.same_scale_kws:
        if on and call.get(kw) is not None and float(call[kw]) != float(scales[0]):
            raise ValueError(
                f"{pipe_name} was called with {kw}={call[kw]!r} and {a.scale_kw}={scales[0]!r}: it then guides "
                f"each frame with its own scale (a ramp between the two), while {name} takes one scale per "
                f"sample; allowed: {kw} equal to {a.scale_kw}")
    truncation = call.get("cfg_truncation")
    if on and truncation is not None and not (is_finite_number(truncation) and float(truncation) >= 1.0):
        # Z-Image switches to a conditional-only batch at the steps whose normalized time (1 - sigma) is past it.
        raise ValueError(
            f"{pipe_name} was called with cfg_truncation={truncation!r}: the pipeline then drops its "
            f"unconditional batch part-way (at the steps whose normalized time 1 - sigma is past that value), and "
            f"{name} cannot guide a conditional-only step; allowed: cfg_truncation >= 1 (the default 1.0 keeps the "
            "unconditional batch at every step) or None; to guide only some steps, wrap the strategy in "
            "guidance.Interval")
    if sequential:
        # The layout returns n' = (g - s c) / (1 - s): with s = 1 the pipeline's n + s (c - n) is c
        # whatever n' is, and the guided prediction cannot be handed back.
        kws = (a.scale_kw,) + a.expert_scale_kws
        for kw, s in zip(kws, scales[:denoisers]):
            if on and s is not None and float(s) + a.scale_offset == 1.0:
                raise ValueError(f"{pipe_name}: {kw}=1.0 makes the pipeline ignore its unconditional "
                                 f"branch, so {name} cannot guide; use {kw} > 1")
    for kw in a.off_kws:
        if call.get(kw):
            raise ValueError(
                f"{pipe_name} was called with {kw}={call[kw]!r}: that turns on a part of the pipeline's own "
                f"guidance which the hook does not reproduce (an extra branch in the denoiser batch, or a step "
                f"after its CFG), so {name} cannot guide it exactly; call with {kw} off (0 / False / None): the "
                "strategy replaces the pipeline's guidance (guidance.PAG is ours)"
            )
    if a.class_kw is None and needs_reference(strategy):
        reason = unsupported_reason(pipe_name, name)
        if reason is not None:
            raise NotImplementedError(reason)
        reference_prompts(strategy, pipe_name)  # refuses a strategy that gives no reference prompts
    return on


def step_masks(strategy: GuidanceStrategy, ctx: StepContext, state: CallState, pipe_name: str, branches, *,
               sequential: bool, cache_on: bool) -> dict[str, torch.Tensor]:
    """The rows of each branch the strategy asks for at this step, refused where this pipeline cannot provide them;
    sets `state.every_row`. `branches`: the extra branches the handle provides; `cache_on`: a diffusers cache is
    enabled on the denoiser."""
    masks = strategy.branches(ctx)
    unknown = set(masks) - {COND, UNCOND, REF, GUIDE, PERTURBED}
    if unknown:
        raise NotImplementedError(f"branches {sorted(unknown)} are not supported by this pipeline adapter")
    out = {COND: masks[COND], UNCOND: masks[UNCOND] if UNCOND in masks else ctx.none()}
    # One read of the device in the common case (every row of both branches); layouts reuse the answer.
    state.every_row = bool(torch.cat([out[COND], out[UNCOND]]).all())
    if not state.every_row and not bool(out[COND].all()):
        raise NotImplementedError(f"{type(strategy).__name__}: every sample needs its conditional branch")
    if REF in masks and bool(masks[REF].any()):
        if sequential or (ctx.labels is None and state.reference is None):
            raise NotImplementedError(
                f"{type(strategy).__name__} needs a reference-class branch, which only batched "
                f"class-conditional pipelines (the embedded ClassConditionalPipeline, DiTPipeline) and "
                f"Stable Diffusion / SDXL (with reference prompts) provide; {pipe_name} has neither class "
                "ids nor prompt embeddings to swap"
            )
        out[REF] = masks[REF]
    if GUIDE in masks:  # kept even when no row asks: the strategy then reads NaN rows, no call is made
        if GUIDE not in branches:
            raise ValueError(f"{type(strategy).__name__} asks for the guide model's prediction but none was "
                             "given; allowed: apply_guidance(pipe, strategy, guide_model=model)")
        out[GUIDE] = masks[GUIDE]
    if PERTURBED in masks:
        if PERTURBED not in branches:
            raise ValueError(f"{type(strategy).__name__} asks for the perturbed branch but names no "
                             "perturbation (its `perturbation` is None)")
        out[PERTURBED] = masks[PERTURBED]
    if cache_on and (REF in out or PERTURBED in out or not state.every_row):
        # FasterCache splits every denoiser batch into [uncond; cond] halves and the other caches reuse
        # outputs of earlier steps by position: a batch of other rows would be misread, silently.
        raise NotImplementedError(
            f"{type(strategy).__name__} evaluates only some branches at step {ctx.step}, which changes the "
            f"denoiser batch that {pipe_name}'s cache (diffusers enable_cache) relies on; use a strategy that "
            f"evaluates every branch at every step (CFG, APG, Rescale) or disable the cache (disable_cache())"
        )
    return out


def check_finite(state: CallState, strategy: GuidanceStrategy, pipe_name: str) -> None:
    """After a call: numbers that cannot be right are an error, not images (named: strategy, scale, step)."""
    step = state.first_non_finite_step()
    if step is not None:
        raise ValueError(
            f"{pipe_name}: the guided prediction of {strategy!r} at the call's scale "
            f"{state.scales[0]} holds NaN or inf from step {step} of {state.step}; the images are not "
            "valid. Check the strategy's settings (a scale, threshold or schedule far out of range) and the "
            "model's dtype (fp16 overflow)")
