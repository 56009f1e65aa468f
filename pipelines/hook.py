"""`apply_guidance`: run a guidance strategy inside an unmodified diffusers pipeline.

Two pieces, both removable without a trace:

1. A diffusers `ModelHook` on the denoiser(s) (`pipe.unet` / `pipe.transformer`, Wan 2.2's
   `transformer_2`). On each guided call the pipeline's batch layout (`pipelines.layouts`, one
   class per layout) asks the strategy which branches each sample needs, evaluates only those
   rows, lets the strategy combine them, and returns an output that the pipeline's own CFG
   formula turns into exactly the guided prediction. The handle below holds what all layouts
   share: installation, per-call state, the StepContext (`_context`), masks and NFE counting.
2. A per-instance subclass of the pipeline whose `__call__` records the call's own guidance scale,
   refuses up front a call the strategy cannot guide, lets the strategy check the call
   (`strategy.on_call(pipe, bound_arguments)`, e.g. LinearAG refuses a pipeline, scheduler, step
   count or negative prompt its coefficients were not fitted for) and resets the strategy's
   per-sample state before delegating to the original `__call__` (dunder methods are looked up on
   the type, so an instance attribute cannot do this).
"""

from __future__ import annotations

import inspect
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from guidance.base import (COND, GUIDE, PERTURBED, REF, UNCOND, GuidanceStrategy, StepContext, guided_prediction,
                           is_finite_number)

from .adapters import Adapter, adapter_for
from .branches import ConditionalRowsBranch, GuideModelBranch, perturbed_branch
from .call import describe_call
from .branches.nag import NAGConditional
from .layouts import LAYOUTS, DenoiserCall, Layout
from .layouts.cond_only import CondOnly
from .layouts.rows import mark_per_sample_lists
from .parametrization import build_step_context
from .timestep_ratio import stepped_timestep
from .reference import ReferencePrompts, encode_reference_prompts, unsupported_reason
from .skip_layer import SkipLayerGuide

HOOK_NAME = "guidance_kit"

# Strategies with a pipeline call in progress (their per-call state: momentum, switches, histories), by id: one
# strategy object guides one call at a time, so two pipelines (or threads) cannot share it silently.
_STRATEGIES_IN_USE: dict[int, str] = {}
_IN_USE_LOCK = threading.Lock()


def _strategy_tree(strategy: GuidanceStrategy) -> list[GuidanceStrategy]:
    return [strategy] + [s for child in strategy.wrapped_strategies() for s in _strategy_tree(child)]


@contextmanager
def _strategy_in_use(strategy: GuidanceStrategy, pipe_name: str):
    """Claim `strategy` (and those it wraps) for one pipeline call; refuse one another call is using."""
    tree = _strategy_tree(strategy)
    with _IN_USE_LOCK:
        busy = [s for s in tree if id(s) in _STRATEGIES_IN_USE]
        if busy:
            raise RuntimeError(
                f"{pipe_name}: strategy {busy[0]!r} is guiding another pipeline call right now "
                f"({_STRATEGIES_IN_USE[id(busy[0])]}); a strategy keeps per-call state (momentum, switches), so "
                "one object guides one call at a time: give each pipeline or thread its own strategy "
                "(guidance.from_config(strategy.to_config()) makes a copy)")
        for s in tree:
            _STRATEGIES_IN_USE[id(s)] = f"{pipe_name} in thread {threading.current_thread().name}"
    try:
        yield
    finally:
        with _IN_USE_LOCK:
            for s in tree:
                _STRATEGIES_IN_USE.pop(id(s), None)


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class _DenoiserHook(ModelHook):
    """Stateful so that diffusers' `cache_context("cond"/"uncond")` reaches it (Flux)."""

    _is_stateful = True

    def __init__(self, session: "GuidanceHandle", expert: int = 0):
        super().__init__()
        self.session = session
        self.expert = expert
        self.context = StateManager(_NoState)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        name = self.context._context.name if self.context._context is not None else None
        return self.session._forward(self.fn_ref.original_forward, self.expert, name, args, kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.context.reset()
        return module


# --- the handle -----------------------------------------------------------------------------------

@dataclass
class CallState:
    """State of the pipeline call in progress."""

    scales: list[float | None]  # the call's own guidance scale, per denoiser (Wan 2.2: guidance_scale_2)
    rescale: float
    step: int = 0
    num_steps: int | None = None
    # The masks of the rows evaluated at each step, kept as they come and summed once at the end of the call
    # (a running sum would cost a few tensor operations per step on the masks' device).
    evaluated: list[torch.Tensor] = field(default_factory=list)
    # The extra branches' rows (GUIDE, PERTURBED: pipelines.branches), counted apart, per branch.
    extra_evaluated: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    # Per step, the float32 sum of the guided prediction (finite exactly when it is): 0-dim tensors on its device,
    # read once at the end of the call (a read per step would synchronise an accelerator at every step).
    finite: list[torch.Tensor] = field(default_factory=list)
    every_row: bool = True  # this step evaluates every row of both branches (set by GuidanceHandle.masks)
    guide_placed: bool = False  # the guide model's device / dtype was checked in this call
    reference: ReferencePrompts | None = None  # text pipelines: the class prompts' inputs for REF rows
    solver: dict = field(default_factory=dict)  # build_step_context's per-call state
    ctx: StepContext | None = None  # the step's context (the conditional modifier reads its samples' window)
    cond_only: bool = False  # the pipeline runs no unconditional pass (NAG alone): layouts.CondOnly
    # Adapter.denoisers_in_turn (unCLIP): the denoiser whose run is in progress, and the step at which it began.
    stage: int = 0
    stage_start: int = 0

    def first_non_finite_step(self) -> int | None:
        """The first step whose guided prediction held NaN or inf, or None."""
        if not self.finite:
            return None
        flags = torch.isfinite(_stacked(self.finite))
        return None if bool(flags.all()) else int((~flags).nonzero()[0, 0])

    def counts(self, branches) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """(nfe, {branch: its count}) per sample on the CPU, for the extra `branches` the handle provides: None
        and {} before any step ran."""
        if not self.evaluated:
            return None, {}
        nfe = _stacked(self.evaluated).sum(0)
        extra = self.extra_evaluated
        return nfe, {b: _stacked(extra[b]).sum(0) if extra.get(b) else torch.zeros_like(nfe) for b in branches}


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The per-step tensors of a call stacked on their device and read back once (not one read per step)."""
    return torch.stack([t.to(tensors[0].device) for t in tensors]).cpu()


def _needs_reference(strategy: GuidanceStrategy) -> bool:
    """Whether the strategy (or one it wraps) may ask for a REF branch (defines reference_labels)."""
    if type(strategy).reference_labels is not GuidanceStrategy.reference_labels:
        return True
    return any(_needs_reference(child) for child in strategy.wrapped_strategies())


class GuidanceHandle:
    """Returned by `apply_guidance`; a context manager, or call `.remove()` yourself.

    Holds what every layout shares: installation, the per-call state, the one place a StepContext
    is built (`_context`), branch masks and NFE counting. The batch layout itself (which rows of
    which call are cond / uncond) is a `pipelines.layouts.Layout`.

    After a pipeline call, `.nfe` holds the number of denoiser evaluations each sample received
    (a (B,) int tensor, B = batch x num_images_per_prompt) and `.nfe_per_sample` its mean: the pipeline's
    own conditional and unconditional rows. The extra branches are counted apart: with a guide model,
    `.guide_nfe` / `.guide_nfe_per_sample` (None without one); with a perturbed branch (PAG),
    `.perturbed_nfe` / `.perturbed_nfe_per_sample` (None without one).
    """

    def __init__(self, pipe, strategy: GuidanceStrategy, guide_model: torch.nn.Module | None = None):
        if not isinstance(strategy, GuidanceStrategy):
            raise TypeError(f"strategy={strategy!r} is not a guidance.GuidanceStrategy")
        self.pipe = pipe
        self.pipe_name = type(pipe).__name__
        self.strategy = strategy
        self.adapter: Adapter = adapter_for(pipe)
        self.denoisers: list[torch.nn.Module] = [
            m for m in (getattr(pipe, attr, None) for attr in self.adapter.denoisers) if m is not None
        ]
        self.denoiser = self.denoisers[0]
        self.layout: Layout = LAYOUTS[self.adapter.layout](self)
        self.cond_only_layout = CondOnly(self)  # calls without an unconditional pass (NAG alone)
        self.branches: dict[str, ConditionalRowsBranch] = self._extra_branches(guide_model)
        self.nfe: torch.Tensor | None = None
        self.extra_nfe: dict[str, torch.Tensor] = {}
        self.call: CallState | None = None
        self._call_lock = threading.Lock()  # one pipeline call at a time through this handle
        self._cache_on = False
        self._installed = False
        self._removed = False
        self._install()

    def _extra_branches(self, guide_model) -> dict[str, ConditionalRowsBranch]:
        """The providers of the branches beyond the pipeline's own (pipelines.branches), checked up front."""
        branches: dict[str, ConditionalRowsBranch] = {}
        guide = GuideModelBranch.resolve(self, guide_model)
        if guide is not None:
            branches[GUIDE] = guide
        perturbations = {s.perturbation for s in _strategy_tree(self.strategy) if s.perturbation is not None}
        if len(perturbations) > 1:
            raise ValueError(f"{type(self.strategy).__name__} asks for several perturbations "
                             f"{sorted(map(str, perturbations))}; allowed: one perturbed branch per pipeline")
        self.conditional: NAGConditional | None = None  # NAG: a change of the conditional pass, not a branch
        if perturbations and next(iter(perturbations)).kind == "nag":
            node = next(s for s in _strategy_tree(self.strategy) if getattr(s.perturbation, "kind", None) == "nag")
            self.conditional = NAGConditional(self, node, node is self.strategy)
        elif perturbations:
            branches[PERTURBED] = perturbed_branch(self, perturbations.pop())
        return branches

    @property
    def guide_model(self) -> torch.nn.Module | None:
        return self.branches[GUIDE].model if GUIDE in self.branches else None

    @property
    def guide_nfe(self) -> torch.Tensor | None:
        return self.extra_nfe.get(GUIDE) if GUIDE in self.branches else None

    @property
    def perturbed_nfe(self) -> torch.Tensor | None:
        return self.extra_nfe.get(PERTURBED) if PERTURBED in self.branches else None

    @property
    def perturbed_nfe_per_sample(self) -> float | None:
        return None if self.perturbed_nfe is None else float(self.perturbed_nfe.float().mean())

    # --- installation ----------------------------------------------------------------------------
    def _install(self) -> None:
        for module in self.denoisers:
            if HookRegistry.check_if_exists_or_initialize(module).get_hook(HOOK_NAME) is not None:
                raise RuntimeError(f"{self.pipe_name} already has a guidance strategy applied; remove() it first")
        for expert, module in enumerate(self.denoisers):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_DenoiserHook(self, expert), HOOK_NAME)
        original = type(self.pipe)
        handle = self

        def __call__(pipe_self, *args, **kwargs):
            if pipe_self is not handle.pipe:  # a copy (copy.deepcopy) of the guided pipeline: no handle of its own
                raise RuntimeError(f"{handle.pipe_name}: this pipeline is a copy of one guided by apply_guidance, and "
                                   "the copy has no handle to count, check or remove its guidance; copy the pipeline "
                                   "before apply_guidance (or after remove()), then apply guidance to the copy")
            if not handle._call_lock.acquire(blocking=False):
                raise RuntimeError(f"{handle.pipe_name}: a guided call of this pipeline is already running (another "
                                   "thread, or a call from inside a callback); a guided pipeline runs one call at a "
                                   "time: give each thread its own pipeline and strategy")
            try:
                with _strategy_in_use(handle.strategy, handle.pipe_name), \
                        handle._pipeline_call(original, pipe_self, args, kwargs):
                    return original.__call__(pipe_self, *args, **kwargs)
            finally:
                handle._call_lock.release()

        # Same name and module, so repr, save_pretrained and model_index.json stay unchanged.
        guided = type(original.__name__, (original,), {"__call__": __call__, "__module__": original.__module__,
                                                       "_guidance_original_class": original})
        self.pipe.__class__ = guided
        self._installed = True

    def remove(self) -> None:
        """Uninstall: the pipeline behaves bit-identically to before `apply_guidance`."""
        if not self._installed:
            return
        if self.call is not None:
            raise RuntimeError(f"{self.pipe_name}: remove() during a guided pipeline call (from a step callback?) "
                               "would leave the remaining steps unguided and the NFE half counted; remove it after "
                               "the call returns")
        for module in self.denoisers:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(HOOK_NAME, recurse=False)
        self.pipe.__class__ = self.pipe.__class__._guidance_original_class
        self._installed = False
        self._removed = True

    def __deepcopy__(self, memo) -> "GuidanceHandle":
        # A deep copy of a guided pipeline reaches its handle through the hooks: the copy keeps pointing at this
        # handle, whose __call__ refuses to guide any pipeline but its own (see _install).
        return self

    def __enter__(self) -> "GuidanceHandle":
        if self._removed:
            raise RuntimeError(f"{self.pipe_name}: this handle was removed, so the pipeline is no longer guided; "
                               "call apply_guidance(pipe, strategy) again for a new one")
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def nfe_per_sample(self) -> float | None:
        return None if self.nfe is None else float(self.nfe.float().mean())

    @property
    def guide_nfe_per_sample(self) -> float | None:
        return None if self.guide_nfe is None else float(self.guide_nfe.float().mean())

    # --- one pipeline call ---------------------------------------------------------------------------
    @contextmanager
    def _pipeline_call(self, original: type, pipe_self, args, kwargs):
        bound = inspect.signature(original.__call__).bind(pipe_self, *args, **kwargs)
        bound.apply_defaults()
        call = bound.arguments
        a = self.adapter
        scale = call.get(a.scale_kw)
        scales = [scale] + [call.get(kw) if call.get(kw) is not None else scale for kw in a.expert_scale_kws]
        runs_uncond = self._check_call(call, scales)
        self.strategy.on_call(describe_call(pipe_self, MappingProxyType(call), a))
        self.strategy.reset()
        reference = None  # text pipelines: the class prompts, encoded once for this call (checked by _check_call)
        if a.class_kw is None and _needs_reference(self.strategy):
            reference = encode_reference_prompts(pipe_self, self.pipe_name, self._reference_prompts(), call)
        self.call = CallState([None if s is None else float(s) + a.scale_offset for s in scales[: len(self.denoisers)]],
                              float(call.get("guidance_rescale") or 0.0), reference=reference)
        if self.conditional is not None:  # NAG: the negative prompt encoded once; no unconditional pass needed
            self.conditional.start_call(pipe_self, call)
            self.call.cond_only = not runs_uncond
        self.layout.start_call()
        for branch in self.branches.values():
            branch.start_call()
        # diffusers' cache hooks (FasterCache, PyramidAttentionBroadcast, FirstBlockCache, ...) keep state
        # across steps that assumes the pipeline's own batch; see `masks`.
        self._cache_on = any(getattr(m, "is_cache_enabled", False) for m in self.denoisers)
        try:
            yield
            self._check_finite()
        finally:
            self.layout.end_call()
            for branch in self.branches.values():
                branch.end_call()
            self.nfe, self.extra_nfe = self.call.counts(self.branches)
            self.call = None

    def _check_finite(self) -> None:
        """After a call: numbers that cannot be right are an error, not images (named: strategy, scale, step)."""
        step = self.call.first_non_finite_step()
        if step is not None:
            raise ValueError(
                f"{self.pipe_name}: the guided prediction of {self.strategy!r} at the call's scale "
                f"{self.call.scales[0]} holds NaN or inf from step {step} of {self.call.step}; the images are not "
                "valid. Check the strategy's settings (a scale, threshold or schedule far out of range) and the "
                "model's dtype (fp16 overflow)")

    def _check_call(self, call: dict, scales: list) -> bool:
        """Refuse, before any step runs, a call in which the pipeline runs no unconditional branch
        or which the strategy cannot guide here. Returns whether the pipeline runs its unconditional branch."""
        a, name = self.adapter, type(self.strategy).__name__
        for kw, s in zip((a.scale_kw,) + a.expert_scale_kws, scales):
            if s is not None and not is_finite_number(s):
                raise ValueError(f"{self.pipe_name} was called with {kw}={s!r}; allowed: a finite number "
                                 f"(> {a.on_above:g} turns the pipeline's unconditional branch on)")
        on = scales[0] is not None and scales[0] > a.on_above
        if a.denoisers_in_turn:  # unCLIP runs CFG in every stage when any stage's scale is on
            on = any(s is not None and s > a.on_above for s in scales)
        if a.needs_negative:
            on = on and (call.get("negative_prompt") is not None or call.get("negative_prompt_embeds") is not None)
        if not on and getattr(self.strategy, "requires_uncond", True):
            raise ValueError(
                f"{self.pipe_name} was called with {a.scale_kw}={scales[0]!r}, so it runs no "
                f"unconditional branch and {name} cannot guide; {a.enable_hint}"
            )
        for kw in a.same_scale_kws:
            if on and call.get(kw) is not None and float(call[kw]) != float(scales[0]):
                raise ValueError(
                    f"{self.pipe_name} was called with {kw}={call[kw]!r} and {a.scale_kw}={scales[0]!r}: it then guides "
                    f"each frame with its own scale (a ramp between the two), while {name} takes one scale per "
                    f"sample; allowed: {kw} equal to {a.scale_kw}")
        truncation = call.get("cfg_truncation")
        if on and truncation is not None and not (is_finite_number(truncation) and float(truncation) >= 1.0):
            # Z-Image switches to a conditional-only batch at the steps whose normalized time (1 - sigma) is past it.
            raise ValueError(
                f"{self.pipe_name} was called with cfg_truncation={truncation!r}: the pipeline then drops its "
                f"unconditional batch part-way (at the steps whose normalized time 1 - sigma is past that value), and "
                f"{name} cannot guide a conditional-only step; allowed: cfg_truncation >= 1 (the default 1.0 keeps the "
                "unconditional batch at every step) or None; to guide only some steps, wrap the strategy in "
                "guidance.Interval")
        if self.layout.sequential:
            # The layout returns n' = (g - s c) / (1 - s): with s = 1 the pipeline's n + s (c - n) is c
            # whatever n' is, and the guided prediction cannot be handed back.
            kws = (a.scale_kw,) + a.expert_scale_kws
            for kw, s in zip(kws, scales[: len(self.denoisers)]):
                if on and s is not None and float(s) + a.scale_offset == 1.0:
                    raise ValueError(f"{self.pipe_name}: {kw}=1.0 makes the pipeline ignore its unconditional "
                                     f"branch, so {name} cannot guide; use {kw} > 1")
        for kw in a.off_kws:
            if call.get(kw):
                raise ValueError(
                    f"{self.pipe_name} was called with {kw}={call[kw]!r}: that turns on a part of the pipeline's own "
                    f"guidance which the hook does not reproduce (an extra branch in the denoiser batch, or a step "
                    f"after its CFG), so {name} cannot guide it exactly; call with {kw} off (0 / False / None): the "
                    "strategy replaces the pipeline's guidance (guidance.PAG is ours)"
                )
        if a.class_kw is None and _needs_reference(self.strategy):
            reason = unsupported_reason(self.pipe_name, name)
            if reason is not None:
                raise NotImplementedError(reason)
            self._reference_prompts()  # refuses a strategy that gives no reference prompts
        return on

    def _reference_prompts(self) -> list[str]:
        """The prompt of each reference class id, from the strategy (text-to-image pipelines)."""
        prompts = getattr(self.strategy, "reference_prompts", lambda: None)()
        if not prompts:
            name = type(self.strategy).__name__
            raise ValueError(f"{name}: {self.pipe_name} has no class ids, so the reference-class branch needs the "
                             f"reference class's prompt; pass prompt_template (e.g. 'a photo of a {{}}') and "
                             f"class_names (or a classifier with class names) to {name}")
        return list(prompts)

    # --- shared by the layouts ----------------------------------------------------------------------
    def _context(self, x: torch.Tensor, timestep, expert: int = 0) -> StepContext:
        """The one place a StepContext is built (x: the noisy sample of the B guided samples)."""
        call = self.call
        if self.adapter.denoisers_in_turn and expert != call.stage:
            # unCLIP's decoder starts a new diffusion run after its prior's: its own steps, scheduler tables and
            # strategy state (momentum, switches), as if it were a call of its own.
            call.stage, call.stage_start, call.solver = expert, call.step, {}
            self.strategy.reset()
        # build_step_context keeps the scheduler-step counter of multi-evaluation solvers in `solver`.
        call.solver.update(step=call.step - call.stage_start, scale=call.scales[expert], rescale=call.rescale)
        if self.adapter.first_step_from_timestep:
            call.solver.setdefault("tables", {})["first_step_from_timestep"] = True
        if self.adapter.preconditioning is not None:  # the pipeline preconditions the output itself
            call.solver.setdefault("tables", {})["preconditioning"] = self.adapter.preconditioning
        scheduler = self.adapter.scheduler_of(self.pipe, expert)
        timestep = stepped_timestep(self.adapter.timestep_ratio, scheduler, timestep, call.solver["step"],
                                    self.pipe_name)  # Würstchen / Stable Cascade pass a ratio
        ctx = build_step_context(scheduler, call.solver, x, timestep)
        call.num_steps = call.solver["num_steps"]
        call.ctx = ctx
        return ctx

    def sample_of(self, x: torch.Tensor) -> torch.Tensor:
        """The noisy sample inside the denoiser input: inpainting UNets append mask and masked-image
        channels after it, so only the first `out_channels` channels are the sample."""
        if self.adapter.guided_channels is not None:
            return x[:, : self.adapter.guided_channels]
        if self.adapter.extra_input_channels:
            channels = self.denoiser.config.out_channels
            channels = channels // 2 if self.adapter.guide_channels_of_input else channels  # learned sigma
            return x.narrow(self.adapter.channel_dim, 0, channels)
        return x

    def masks(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        masks = self.strategy.branches(ctx)
        unknown = set(masks) - {COND, UNCOND, REF, GUIDE, PERTURBED}
        if unknown:
            raise NotImplementedError(f"branches {sorted(unknown)} are not supported by this pipeline adapter")
        out = {COND: masks[COND], UNCOND: masks[UNCOND] if UNCOND in masks else ctx.none()}
        # One read of the device in the common case (every row of both branches); layouts reuse the answer.
        self.call.every_row = bool(torch.cat([out[COND], out[UNCOND]]).all())
        if not self.call.every_row and not bool(out[COND].all()):
            raise NotImplementedError(f"{type(self.strategy).__name__}: every sample needs its conditional branch")
        if REF in masks and bool(masks[REF].any()):
            if self.layout.sequential or (ctx.labels is None and self.call.reference is None):
                raise NotImplementedError(
                    f"{type(self.strategy).__name__} needs a reference-class branch, which only batched "
                    f"class-conditional pipelines (the embedded ClassConditionalPipeline, DiTPipeline) and "
                    f"Stable Diffusion / SDXL (with reference prompts) provide; {self.pipe_name} has neither class "
                    "ids nor prompt embeddings to swap"
                )
            out[REF] = masks[REF]
        if GUIDE in masks:  # kept even when no row asks: the strategy then reads NaN rows, no call is made
            if GUIDE not in self.branches:
                raise ValueError(f"{type(self.strategy).__name__} asks for the guide model's prediction but none was "
                                 "given; allowed: apply_guidance(pipe, strategy, guide_model=model)")
            out[GUIDE] = masks[GUIDE]
        if PERTURBED in masks:
            if PERTURBED not in self.branches:
                raise ValueError(f"{type(self.strategy).__name__} asks for the perturbed branch but names no "
                                 "perturbation (its `perturbation` is None)")
            out[PERTURBED] = masks[PERTURBED]
        if self._cache_on and (REF in out or PERTURBED in out or not self.call.every_row):
            # FasterCache splits every denoiser batch into [uncond; cond] halves and the other caches reuse
            # outputs of earlier steps by position: a batch of other rows would be misread, silently.
            raise NotImplementedError(
                f"{type(self.strategy).__name__} evaluates only some branches at step {ctx.step}, which changes the "
                f"denoiser batch that {self.pipe_name}'s cache (diffusers enable_cache) relies on; use a strategy that "
                f"evaluates every branch at every step (CFG, APG, Rescale) or disable the cache (disable_cache())"
            )
        return out

    def reference_kwargs(self, kwargs: dict, rows: torch.Tensor, labels: torch.Tensor) -> dict:
        """The denoiser keywords with the conditional `rows` conditioned on reference classes `labels`:
        their class ids swapped (class-conditional pipelines), or their prompt's text inputs
        (text-to-image pipelines, `pipelines.reference`). A new dict; the call's tensors are untouched."""
        if self.call.reference is not None:
            return self.call.reference.swap(kwargs, rows, labels, self.pipe_name)
        key = self.adapter.class_kw
        ids = kwargs[key].clone()
        ids[rows.to(ids.device)] = labels.to(ids)
        return {**kwargs, key: ids}

    def combine(self, ctx: StepContext, masks: dict, preds: dict, channels: int) -> torch.Tensor:
        """The strategy's guided prediction for this step, in the denoiser's output format; counts the NFE.

        Learned-sigma models (DiT, PixArt) guide only the first `channels` (= input) channels and keep
        the conditional rest; Lumina 2 outputs the negated velocity, so the strategy sees it un-negated; PRX Pixel
        outputs x0, so the strategy sees the velocity its pipeline steps with."""
        a = self.adapter
        cond = preds[COND]
        ctx.evaluated = masks
        if a.guide_channels_of_input:  # channels: those of the sample (ctx.x), on the adapter's channel axis
            preds = {k: v.narrow(a.channel_dim, 0, channels) for k, v in preds.items()}
        if a.negated_output:
            preds = {k: -v for k, v in preds.items()}
        if a.x0_velocity_floor is not None:  # PRX Pixel: the velocity (x - x0) / max(t, floor) its scheduler steps
            x = ctx.x.to(torch.promote_types(cond.dtype, torch.float32))
            t_x = torch.tensor(ctx.timestep, dtype=torch.float32, device=x.device).clamp(min=a.x0_velocity_floor)
            preds = {k: (x - v.to(x.dtype)) / t_x for k, v in preds.items()}
        guided = guided_prediction(self.strategy, ctx, preds)  # the call's guidance_rescale included
        if a.x0_velocity_floor is not None:  # back to the x0 prediction whose velocity is the guided one
            guided = x - t_x * guided.to(x.dtype)
        guided = (-guided if a.negated_output else guided).to(cond.dtype)
        # NaN and inf survive a float32 sum (a sum past 3e38 is no valid prediction either): one op per step.
        self.call.finite.append(guided.sum(dtype=torch.float32))
        self._finish_step(masks)
        d = a.channel_dim
        if a.guide_channels_of_input and cond.shape[d] > channels:  # DiT's learned-sigma channels, kept
            return torch.cat([guided, cond.narrow(d, channels, cond.shape[d] - channels)], dim=d)
        return guided

    def _finish_step(self, masks: dict[str, torch.Tensor]) -> None:
        for k, m in masks.items():
            if k in self.branches:
                self.call.extra_evaluated.setdefault(k, []).append(m)
            else:
                self.call.evaluated.append(m)
        self.call.step += 1

    def evaluate_branches(self, call: DenoiserCall, masks: dict, cond_rows: torch.Tensor, preds: dict,
                          ctx: StepContext | None = None, uncond_rows: torch.Tensor | None = None) -> None:
        """Adds to `preds` each extra branch the strategy asked for at this step (pipelines.branches), after the
        pipeline's own rows; `ctx` and `uncond_rows` for providers built from those rows (SAG's)."""
        for name, branch in self.branches.items():
            if name in masks:
                preds[name] = branch.evaluate_step(call, masks, cond_rows, preds, ctx, uncond_rows)

    # --- the denoiser call -----------------------------------------------------------------------
    def _forward(self, forward: Callable, expert: int, context_name: str | None, args: tuple, kwargs: dict):
        a = self.adapter
        if self.call is None or any(kwargs.get(k) is not None for k in a.passthrough_kws):
            return forward(*args, **kwargs)
        x = args[0] if args else kwargs[a.sample_kw]
        if isinstance(x, list):
            # One tensor per row (Z-Image: latents as [C, 1, H, W] x 2B): the layouts see the stacked batch, and
            # the call's lists of that many items (its caption features) have their items selected as rows.
            x = self._stacked_sample(x)
            args, kwargs = mark_per_sample_lists(args, kwargs, x.shape[0])
        timestep = kwargs[a.timestep_kw] if a.timestep_kw in kwargs else (args[1] if len(args) > 1 else None)
        layout = self.cond_only_layout if self.call.cond_only else self.layout
        conditional = self.conditional.bind if self.conditional is not None else None
        return layout.forward(DenoiserCall(forward, args, kwargs, x, timestep, context_name, expert, conditional))

    def _stacked_sample(self, x: list) -> torch.Tensor:
        if not x or not all(torch.is_tensor(t) and t.shape == x[0].shape for t in x):
            raise NotImplementedError(
                f"{self.pipe_name}: its denoiser received its sample as a list of {len(x)} items that are not "
                "tensors of one shape, which the hook cannot stack into a batch of rows; allowed: a tensor, or a list "
                "with one tensor per row, all of one shape")
        return torch.stack(x)


def apply_guidance(pipe, strategy: GuidanceStrategy,
                   guide_model: torch.nn.Module | SkipLayerGuide | None = None) -> GuidanceHandle:
    """Swap the guidance rule of a diffusers pipeline.

        with apply_guidance(pipe, APG(eta=0.0, norm_threshold=15, momentum=-0.5)) as handle:
            image = pipe(prompt, guidance_scale=15).images[0]
        print(handle.nfe_per_sample)

    The strategy's scale defaults to the call's own `guidance_scale` (`true_cfg_scale` for Flux).
    guide_model: the second denoiser of strategies that ask for the GUIDE branch (Autoguidance): same
    inputs and outputs as the pipeline's denoiser, on its device and dtype; called with the
    conditional call's arguments; or `pipelines.SkipLayerGuide(layers)`, the denoiser itself with those
    transformer blocks skipped (an approximation). Its evaluations are counted in `handle.guide_nfe`.
    """
    return GuidanceHandle(pipe, strategy, guide_model)
