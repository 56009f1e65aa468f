"""`apply_guidance`: run a guidance strategy inside an unmodified diffusers pipeline.

Two pieces, both removable without a trace:

1. A diffusers `ModelHook` on the denoiser(s) (`pipe.unet` / `pipe.transformer`, Wan 2.2's
   `transformer_2`). On each guided call the pipeline's batch layout (`pipelines.layouts`, one
   class per layout) asks the strategy which branches each sample needs, evaluates only those
   rows, lets the strategy combine them, and returns an output that the pipeline's own CFG
   formula turns into exactly the guided prediction. The handle below holds what all layouts
   share: installation, per-call state and the StepContext (`_context`); the rest has a module of
   its own: `call_checks` (refusals before, during and after a call), `call_state` (a call's state
   and NFE counts), `output_view` (the denoiser output as the strategy sees it), `branches`
   (the extra branches' providers), `strategy_claim` (one call per strategy object at a time).
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
from types import MappingProxyType
from typing import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from guidance.base import COND, GUIDE, PERTURBED, GuidanceStrategy, StepContext, guided_prediction

from .adapters import Adapter, adapter_for
from .branches import ConditionalRowsBranch, NAGConditional, extra_branches
from .call import describe_call
from .call_checks import check_call, check_finite, needs_reference, reference_prompts, step_masks
from .call_state import CallState
from .layouts import LAYOUTS, DenoiserCall, Layout
from .layouts.cond_only import CondOnly
from .layouts.rows import mark_per_sample_lists
from .output_view import OutputView
from .parametrization import build_step_context
from .timestep_ratio import stepped_timestep
from .reference import encode_reference_prompts
from .skip_layer import SkipLayerGuide
from .strategy_claim import claim, strategy_tree as _strategy_tree  # noqa: F401  (evaluation.runner imports it here)

HOOK_NAME = "guidance_kit"


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

class GuidanceHandle:
    """Returned by `apply_guidance`; a context manager, or call `.remove()` yourself.

    Holds what every layout shares: installation, the per-call state (`CallState`) and the one place
    a StepContext is built (`_context`). The batch layout itself (which rows of which call are cond /
    uncond) is a `pipelines.layouts.Layout`; the layouts ask the providers (`pipelines.branches`) for
    the extra branches; the refusals are `pipelines.call_checks`.

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
        self.branches: dict[str, ConditionalRowsBranch]
        self.conditional: NAGConditional | None  # NAG: a change of the conditional pass, not a branch
        self.branches, self.conditional = extra_branches(self, guide_model)
        self.nfe: torch.Tensor | None = None
        self.extra_nfe: dict[str, torch.Tensor] = {}
        self.call: CallState | None = None
        self._call_lock = threading.Lock()  # one pipeline call at a time through this handle
        self._cache_on = False
        self._installed = False
        self._removed = False
        self._install()

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
                with claim(handle.strategy, handle.pipe_name), \
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
        runs_uncond = check_call(a, self.strategy, self.pipe_name, call, scales, sequential=self.layout.sequential,
                                 denoisers=len(self.denoisers))
        self.strategy.on_call(describe_call(pipe_self, MappingProxyType(call), a))
        self.strategy.reset()
        reference = None  # text pipelines: the class prompts, encoded once for this call (checked by check_call)
        if a.class_kw is None and needs_reference(self.strategy):
            reference = encode_reference_prompts(pipe_self, self.pipe_name,
                                                 reference_prompts(self.strategy, self.pipe_name), call)
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
            check_finite(self.call, self.strategy, self.pipe_name)
        finally:
            self.layout.end_call()
            for branch in self.branches.values():
                branch.end_call()
            self.nfe, self.extra_nfe = self.call.counts(self.branches)
            self.call = None

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
        """The rows of each branch the strategy asks for at this step, checked (`call_checks.step_masks`)."""
        return step_masks(self.strategy, ctx, self.call, self.pipe_name, self.branches,
                          sequential=self.layout.sequential, cache_on=self._cache_on)

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

        `channels`: those of the sample (ctx.x); the strategy sees the output through `OutputView` (learned
        sigma, negated output, PRX Pixel's x0)."""
        view = OutputView(self.adapter, ctx, preds[COND], channels)
        ctx.evaluated = masks
        guided = guided_prediction(self.strategy, ctx, view.to_strategy(preds))  # the call's guidance_rescale included
        guided = view.from_strategy(guided)
        self.call.end_step(guided, masks, self.branches)
        return view.output(guided)

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
