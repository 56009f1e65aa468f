"""`apply_guidance`: run a guidance strategy inside an unmodified diffusers pipeline.

Two pieces, both removable without a trace:

1. A diffusers `ModelHook` on the denoiser (`pipe.unet` / `pipe.transformer`). On each guided
   call it asks the strategy which branches each sample needs, evaluates only those rows, lets
   the strategy combine them, and returns an output that the pipeline's own CFG formula turns into
   exactly the guided prediction: `[g; g]` for batched layouts (u + w (g - g) = g for any w), and
   for Flux's sequential calls the conditional output, then n' = (g - s c) / (1 - s) so that
   n' + s (c - n') = g. A strategy may also ask for a REF branch (GFCG): on class-conditional
   pipelines those rows, the conditional inputs with the strategy's class ids, join the same call.
2. A per-instance subclass of the pipeline whose `__call__` records the call's own guidance scale,
   lets the strategy check the call (`strategy.on_call(pipe, bound_arguments)`, e.g. LinearAG
   refuses a pipeline, scheduler, step count or negative prompt its coefficients were not fitted
   for) and resets the strategy's per-sample state before delegating to the original `__call__`
   (dunder methods are looked up on the type, so an instance attribute cannot do this).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from guidance.base import COND, REF, UNCOND, GuidanceStrategy, StepContext

from .adapters import Adapter, adapter_for
from .call import describe_call
from .parametrization import scheduler_parametrization

HOOK_NAME = "guidance_kit"


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class _DenoiserHook(ModelHook):
    """Stateful so that diffusers' `cache_context("cond"/"uncond")` reaches it (Flux)."""

    _is_stateful = True

    def __init__(self, session: "GuidanceHandle"):
        super().__init__()
        self.session = session
        self.context = StateManager(_NoState)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        name = self.context._context.name if self.context._context is not None else None
        return self.session._forward(self.fn_ref.original_forward, name, args, kwargs)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.context.reset()
        return module


# --- batch plumbing -------------------------------------------------------------------------------

def _select_rows(obj: Any, rows: torch.Tensor, batch: int, unbatched: tuple[str, ...] = ()) -> Any:
    """Index every batched tensor (leading dim == batch) in nested args by `rows`."""
    if isinstance(obj, torch.Tensor):
        return obj[rows.to(obj.device)] if obj.ndim >= 1 and obj.shape[0] == batch else obj
    if isinstance(obj, dict):
        return {k: (v if k in unbatched else _select_rows(v, rows, batch, unbatched)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_select_rows(v, rows, batch, unbatched) for v in obj)
    return obj


def _gather_rows(obj: Any, ref_obj: Any, rows: torch.Tensor, ref_rows: torch.Tensor, batch: int) -> Any:
    """`obj` at `rows` followed by `ref_obj` (same structure) at `ref_rows`, for every batched tensor."""
    if isinstance(obj, torch.Tensor):
        if obj.ndim >= 1 and obj.shape[0] == batch:
            return torch.cat([obj[rows.to(obj.device)], ref_obj[ref_rows.to(obj.device)]])
        return obj
    if isinstance(obj, dict):
        return {k: _gather_rows(v, ref_obj[k], rows, ref_rows, batch) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_gather_rows(v, r, rows, ref_rows, batch) for v, r in zip(obj, ref_obj))
    return obj


def _first(output: Any) -> torch.Tensor:
    return output[0]  # tuple (return_dict=False) and diffusers BaseOutput both index this way


def _replace_first(output: Any, tensor: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (tensor,) + tuple(output[1:])
    key = next(iter(output.keys()))
    return type(output)(**{**output, key: tensor})


def _nan_rows(like: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.full((batch,) + tuple(like.shape[1:]), float("nan"), dtype=like.dtype, device=like.device)


# --- the handle -----------------------------------------------------------------------------------

class GuidanceHandle:
    """Returned by `apply_guidance`; a context manager, or call `.remove()` yourself.

    After a pipeline call, `.nfe` holds the number of denoiser evaluations each sample received
    (a (B,) int tensor, B = batch x num_images_per_prompt) and `.nfe_per_sample` its mean.
    """

    def __init__(self, pipe, strategy: GuidanceStrategy):
        if not isinstance(strategy, GuidanceStrategy):
            raise TypeError(f"strategy={strategy!r} is not a guidance.GuidanceStrategy")
        self.pipe = pipe
        self.strategy = strategy
        self.adapter: Adapter = adapter_for(pipe)
        self.denoiser: torch.nn.Module = getattr(pipe, self.adapter.denoiser)
        self.nfe: torch.Tensor | None = None
        self._call: dict | None = None  # state of the pipeline call in progress
        self._installed = False
        self._install()

    # --- installation ----------------------------------------------------------------------------
    def _install(self) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(self.denoiser)
        if registry.get_hook(HOOK_NAME) is not None:
            raise RuntimeError(
                f"{type(self.pipe).__name__} already has a guidance strategy applied; remove() it first"
            )
        registry.register_hook(_DenoiserHook(self), HOOK_NAME)
        original = type(self.pipe)
        handle = self

        def __call__(pipe_self, *args, **kwargs):
            with handle._pipeline_call(original, pipe_self, args, kwargs):
                return original.__call__(pipe_self, *args, **kwargs)

        # Same name and module, so repr, save_pretrained and model_index.json stay unchanged.
        guided = type(original.__name__, (original,), {"__call__": __call__, "__module__": original.__module__,
                                                       "_guidance_original_class": original})
        self.pipe.__class__ = guided
        self._installed = True

    def remove(self) -> None:
        """Uninstall: the pipeline behaves bit-identically to before `apply_guidance`."""
        if not self._installed:
            return
        HookRegistry.check_if_exists_or_initialize(self.denoiser).remove_hook(HOOK_NAME, recurse=False)
        self.pipe.__class__ = self.pipe.__class__._guidance_original_class
        self._installed = False

    def __enter__(self) -> "GuidanceHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def nfe_per_sample(self) -> float | None:
        return None if self.nfe is None else float(self.nfe.float().mean())

    # --- one pipeline call ---------------------------------------------------------------------------
    @contextmanager
    def _pipeline_call(self, original: type, pipe_self, args, kwargs):
        bound = inspect.signature(original.__call__).bind(pipe_self, *args, **kwargs)
        bound.apply_defaults()
        call = bound.arguments
        scale = call.get(self.adapter.scale_kw)
        self._check_guidance_on(call, scale)
        self.strategy.on_call(describe_call(pipe_self, MappingProxyType(call), self.adapter))
        self.strategy.reset()
        self._call = {
            "scale": None if scale is None else float(scale),
            "rescale": float(call.get("guidance_rescale") or 0.0),
            "step": 0,
            "num_steps": None,
            "nfe": None,
            "pending": None,
        }
        try:
            yield
        finally:
            self.nfe = self._call["nfe"]
            self._call = None

    def _check_guidance_on(self, call: dict, scale) -> None:
        on = scale is not None and scale > 1
        if self.adapter.layout == "sequential":
            on = on and (call.get("negative_prompt") is not None or call.get("negative_prompt_embeds") is not None)
        if not on and getattr(self.strategy, "requires_uncond", True):
            raise ValueError(
                f"{type(self.pipe).__name__} was called with {self.adapter.scale_kw}={scale!r}, so it runs no "
                f"unconditional branch and {type(self.strategy).__name__} cannot guide; {self.adapter.enable_hint}"
            )

    def _context(self, x_half: torch.Tensor, timestep) -> StepContext:
        from .parametrization import build_step_context

        return build_step_context(self.pipe.scheduler, self._call, x_half, timestep)

    def _count(self, mask: torch.Tensor) -> None:
        if self._call["nfe"] is None:
            self._call["nfe"] = torch.zeros(mask.shape[0], dtype=torch.long)
        self._call["nfe"] += mask.cpu().long()

    # --- the denoiser call -----------------------------------------------------------------------
    def _forward(self, forward: Callable, context_name: str | None, args: tuple, kwargs: dict):
        a = self.adapter
        if self._call is None or any(kwargs.get(k) is not None for k in a.passthrough_kws):
            return forward(*args, **kwargs)
        x = args[0] if args else kwargs[a.sample_kw]
        timestep = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
        if a.layout == "sequential":
            return self._sequential(forward, context_name, x, timestep, args, kwargs)
        return self._batched(forward, x, timestep, args, kwargs)

    def _batched(self, forward: Callable, x: torch.Tensor, timestep, args: tuple, kwargs: dict):
        n = x.shape[0]
        b = n // 2
        if n % 2 or not torch.equal(x[:b], x[b:]):
            raise ValueError(
                f"{type(self.pipe).__name__}: the denoiser received a batch of {n} without an unconditional "
                f"half, so {type(self.strategy).__name__} cannot guide; {self.adapter.enable_hint}"
            )
        cond_first = self.adapter.layout == "cond_uncond"
        cond_rows = torch.arange(b) if cond_first else torch.arange(b, n)
        uncond_rows = torch.arange(b, n) if cond_first else torch.arange(b)
        ctx = self._context(x[:b], timestep)
        class_ids = kwargs.get(self.adapter.class_kw) if self.adapter.class_kw else None
        if torch.is_tensor(class_ids) and class_ids.ndim == 1 and class_ids.shape[0] == n:
            ctx.labels = class_ids[cond_rows.to(class_ids.device)]
        masks = self._masks(ctx)
        if bool(masks[COND].all() and masks[UNCOND].all()) and REF not in masks:
            out = forward(*args, **kwargs)  # the pipeline's own call, untouched
            full = _first(out)
            preds = {COND: full[cond_rows.to(full.device)], UNCOND: full[uncond_rows.to(full.device)]}
        else:
            out, preds = self._evaluate_rows(forward, ctx, masks, cond_rows, uncond_rows, n, args, kwargs)
            full = preds[COND]
        channels = x.shape[1] if self.adapter.guide_channels_of_input else full.shape[1]
        ctx.evaluated = masks
        guided = self.strategy.combine(ctx, {k: v[:, :channels] for k, v in preds.items()}).to(full.dtype)
        rest = preds[COND][:, channels:]  # DiT's learned-sigma channels; empty elsewhere
        g = torch.cat([guided, rest], dim=1) if rest.shape[1] else guided
        self._finish_step(masks)
        return _replace_first(out, torch.cat([g, g]))

    def _evaluate_rows(self, forward: Callable, ctx: StepContext, masks: dict, cond_rows: torch.Tensor,
                       uncond_rows: torch.Tensor, n: int, args: tuple, kwargs: dict):
        """One denoiser call on only the rows the strategy asked for, REF rows appended.

        REF rows are copies of the conditional rows with the class ids the strategy chose, so the
        reference prediction shares the batch with the other branches (one call, not two)."""
        rows = torch.cat([uncond_rows[masks[UNCOND].cpu()], cond_rows[masks[COND].cpu()]]).sort().values
        ref_rows = cond_rows[masks[REF].cpu()] if REF in masks else rows[:0]
        ref_kwargs = kwargs
        if len(ref_rows):
            labels = self.strategy.reference_labels(ctx)
            key = self.adapter.class_kw
            ref_ids = kwargs[key].clone()
            ref_ids[cond_rows.to(ref_ids.device)] = labels.to(ref_ids)
            ref_kwargs = {**kwargs, key: ref_ids}
        out = forward(*_gather_rows(args, args, rows, ref_rows, n), **_gather_rows(kwargs, ref_kwargs, rows, ref_rows, n))
        result = _first(out)
        full = _nan_rows(result, n)
        full[rows.to(full.device)] = result[: len(rows)]
        preds = {COND: full[cond_rows.to(full.device)], UNCOND: full[uncond_rows.to(full.device)]}
        if REF in masks:
            ref = _nan_rows(result, n // 2)
            ref[masks[REF].to(ref.device)] = result[len(rows):]
            preds[REF] = ref
        return out, preds

    def _sequential(self, forward: Callable, name: str | None, x: torch.Tensor, timestep, args: tuple, kwargs: dict):
        call = self._call
        if name == "cond":
            if call["pending"] is not None:  # the previous step never ran its uncond call
                raise RuntimeError(f"{type(self.pipe).__name__}: no unconditional call followed the conditional one")
            ctx = self._context(x, timestep)
            masks = self._masks(ctx)
            out = forward(*args, **kwargs)
            call["pending"] = (ctx, masks, out)
            return out
        if name != "uncond" or call["pending"] is None:
            return forward(*args, **kwargs)
        ctx, masks, cond_out = call["pending"]
        call["pending"] = None
        cond = _first(cond_out)
        b = x.shape[0]
        uncond = _nan_rows(cond, b)
        out = cond_out
        if bool(masks[UNCOND].any()):
            rows = torch.nonzero(masks[UNCOND].cpu()).flatten()
            out = forward(*_select_rows(args, rows, b, self.adapter.unbatched),
                          **_select_rows(kwargs, rows, b, self.adapter.unbatched))
            uncond[rows.to(cond.device)] = _first(out)
        ctx.evaluated = masks
        # combine runs at every step, as in the batched layouts (stateful rules such as LinearAG
        # guide with no unconditional evaluation at all).
        g = self.strategy.combine(ctx, {COND: cond, UNCOND: uncond}).to(cond.dtype)
        self._finish_step(masks)
        if out is cond_out and torch.equal(g, cond):
            # n' = c makes the pipeline's n' + s (c - n') exactly c, with no model evaluation.
            return cond_out
        s = call["scale"]
        return _replace_first(out, (g - s * cond) / (1.0 - s))

    def _masks(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        masks = self.strategy.branches(ctx)
        unknown = set(masks) - {COND, UNCOND, REF}
        if unknown:
            raise NotImplementedError(f"branches {sorted(unknown)} are not supported by this pipeline adapter")
        if not bool(masks[COND].all()):
            raise NotImplementedError(f"{type(self.strategy).__name__}: every sample needs its conditional branch")
        out = {COND: masks[COND], UNCOND: masks.get(UNCOND, ctx.none())}
        if REF in masks and bool(masks[REF].any()):
            if self.adapter.layout == "sequential" or ctx.labels is None:
                raise NotImplementedError(
                    f"{type(self.strategy).__name__} needs a reference-class branch, which only class-conditional "
                    f"pipelines provide (the embedded ClassConditionalPipeline, DiTPipeline); "
                    f"{type(self.pipe).__name__} has no class ids to swap"
                )
            out[REF] = masks[REF]
        return out

    def _finish_step(self, masks: dict[str, torch.Tensor]) -> None:
        self._count(sum(m.long() for m in masks.values()))
        self._call["step"] += 1


def apply_guidance(pipe, strategy: GuidanceStrategy) -> GuidanceHandle:
    """Swap the guidance rule of a diffusers pipeline.

        with apply_guidance(pipe, APG(eta=0.0, norm_threshold=15, momentum=-0.5)) as handle:
            image = pipe(prompt, guidance_scale=15).images[0]
        print(handle.nfe_per_sample)

    The strategy's scale defaults to the call's own `guidance_scale` (`true_cfg_scale` for Flux).
    """
    return GuidanceHandle(pipe, strategy)
