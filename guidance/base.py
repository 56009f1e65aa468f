"""The strategy contract: what a guidance rule declares, receives and returns at every step.

A strategy is plain PyTorch. At each denoising step the caller (our diffusers hook, or any custom
loop) builds a `StepContext`, asks `strategy.branches(ctx)` which model evaluations each sample
needs, runs only those, and hands the predictions to `strategy.combine(ctx, preds)`, which returns
one guided prediction per sample in the model's own output space.

Scales follow the Ho-Salimans / diffusers convention: guided = uncond + w * (cond - uncond), so
w = 1 is the conditional model. A scale left as None takes the pipeline call's own
`guidance_scale` (or `true_cfg_scale`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from .call import CallDescription
from .parametrization import Parametrization

COND, UNCOND, REF = "cond", "uncond", "ref"  # REF: the condition of another class (GFCG)
# GUIDE: a second denoiser (the guide model, e.g. autoguidance's weaker model of the same family) at the
# same input x_t, timestep and condition as COND. The caller supplies the model (pipelines.apply_guidance's
# `guide_model`); guidance/ only asks for its prediction.
GUIDE = "guide"
# PERTURBED: the pipeline's own denoiser at the conditional input with a perturbation active for those rows only
# (PAG's identity self-attention, SEG's blurred queries, skipped blocks, ...). The strategy names it with a
# `Perturbation` (its `perturbation`); the caller applies it (pipelines/branches/perturbed.py).
PERTURBED = "perturbed"


@dataclass(frozen=True)
class Perturbation:
    """What the PERTURBED branch changes in the denoiser; guidance/ names it, the caller applies it.

    kind: "identity_attention" (PAG: the self-attention map replaced by the identity, so each token keeps its
    own value), "skip_blocks" (SLG / STG: whole transformer blocks skipped, their inputs passed through),
    "blur_queries" (SEG: the self-attention queries of those blocks blurred with a Gaussian of std `sigma`), or
    "self_attention_blur" (SAG: the denoiser itself unchanged, at an input built from the step's own pass: its x0
    blurred with std `sigma` where the self-attention map of the module `layers[0]` attends most, noised back).
    layers: for "identity_attention", which self-attention layers, as diffusers' `pag_applied_layers`: regular
    expressions searched in the names of the denoiser's self-attention modules ("mid", "down_blocks.2",
    "transformer_blocks.1"); for "skip_blocks" and "blur_queries", block indices ("7", "8") of the stack `blocks`
    (None: the denoiser's main stack); for "self_attention_blur", the path of the one self-attention module whose
    map is read ("mid_block.attentions.0.transformer_blocks.0.attn1")."""

    kind: str
    layers: tuple[str, ...]
    blocks: str | None = None
    sigma: float | None = None

    KINDS: ClassVar[tuple[str, ...]] = ("identity_attention", "skip_blocks", "blur_queries", "self_attention_blur")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"Perturbation: kind={self.kind!r} is unknown; allowed: {', '.join(self.KINDS)}")
        layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
        if not layers or not all(isinstance(x, str) and x for x in layers):
            raise ValueError(f"Perturbation: layers={self.layers!r} is invalid; allowed: a non-empty list of "
                             "layer-name patterns, e.g. ['mid'] or ['transformer_blocks.1']")
        if self.kind in ("skip_blocks", "blur_queries") and not all(x.isdigit() for x in layers):
            raise ValueError(f"Perturbation: layers={self.layers!r} is invalid for kind={self.kind!r}; allowed: "
                             "block indices, e.g. ['7', '8', '9']")
        object.__setattr__(self, "layers", layers)

# Name -> class of the strategies that configs may name, filled explicitly by `register_strategy`
# (guidance/__init__ registers ours), so that a user's subclass called e.g. `CFG` cannot replace ours.
REGISTRY: dict[str, type["GuidanceStrategy"]] = {}


@dataclass
class StepContext:
    """Everything a strategy may look at for one guided evaluation of a batch of B samples."""

    step: int  # index of this evaluation in the call (0-based)
    num_steps: int  # evaluations the scheduler plans (len(scheduler.timesteps))
    timestep: float  # the timestep value the model receives
    param: Parametrization  # model input x and the x0 <-> prediction conversion
    guidance_scale: float | None = None  # the pipeline call's own scale
    guidance_rescale: float = 0.0  # the pipeline call's own guidance_rescale, where it has one
    evaluated: dict[str, torch.Tensor] = field(default_factory=dict)  # branch -> bool (B,)
    labels: torch.Tensor | None = None  # target class id per sample (B,), on class-conditional pipelines
    # Multi-evaluation solvers (Heun, KDPM2, ...) make several evaluations per scheduler step; rules
    # with per-step state (momentum, switches, histories) decide once per scheduler step. None: one
    # evaluation per step (scheduler_step = step, num_scheduler_steps = num_steps).
    scheduler_step: int | None = None  # index of the scheduler step this evaluation belongs to
    num_scheduler_steps: int | None = None  # scheduler steps the call plans
    starts_step: bool = True  # this evaluation is the first (predictor) one of its scheduler step
    # The VE noise level (sigma / alpha) this scheduler step moves to, 0 at the end; None if unknown.
    next_sigma: float | None = None

    def __post_init__(self) -> None:
        if self.scheduler_step is None:
            self.scheduler_step = self.step
        if self.num_scheduler_steps is None:
            self.num_scheduler_steps = self.num_steps

    @property
    def batch_size(self) -> int:
        return self.param.x.shape[0]

    @property
    def x(self) -> torch.Tensor:
        return self.param.x

    @property
    def sigma(self) -> torch.Tensor:
        """Noise level per sample, (B,): the Karras/VE sigma for VP models, s in [0, 1] for flow."""
        return self.param.noise_level

    @property
    def progress(self) -> float:
        """Fraction of the sampling done before this step, in [0, 1)."""
        return self.step / max(self.num_steps, 1)

    def to_x0(self, pred: torch.Tensor) -> torch.Tensor:
        return self.param.to_x0(pred)

    def from_x0(self, x0: torch.Tensor) -> torch.Tensor:
        return self.param.from_x0(x0)

    def all(self) -> torch.Tensor:
        return torch.ones(self.batch_size, dtype=torch.bool, device=self.x.device)

    def none(self) -> torch.Tensor:
        return torch.zeros(self.batch_size, dtype=torch.bool, device=self.x.device)


Scale = float | Sequence[float] | Callable[[StepContext], float] | None


def is_finite_number(value: Any) -> bool:
    """A real, finite number (Python, numpy or a one-element tensor); bools are not numbers here."""
    try:
        return not isinstance(value, (bool, str, bytes)) and math.isfinite(float(value))
    except (TypeError, ValueError, RuntimeError):
        return False


def _is_scalar(value: Any) -> bool:
    """A numpy scalar, or a tensor / array holding one real number (not a bool)."""
    if isinstance(value, bool) or not hasattr(value, "item") or getattr(value, "dtype", None) is None:
        return False
    size = value.numel() if hasattr(value, "numel") else getattr(value, "size", 0)
    kind = str(value.dtype)
    return size == 1 and "bool" not in kind and "complex" not in kind


def check_range(owner: str, name: str, value: Any, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """Validate a number and return it as float; the error names the parameter, value and range."""
    lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
    allowed = f"a finite number in {lo}, {hi}"
    # numpy scalars and one-element tensors / arrays are numbers too (users pass np.float32(3), x.mean())
    if _is_scalar(value):
        value = value.item() if hasattr(value, "item") else value
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 1e308:  # float() would overflow
        digits = len(str(abs(value)))
        raise ValueError(f"{owner}: {name}=<an integer of {digits} digits> is invalid; allowed: {allowed}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name}={value!r} is invalid; allowed: {allowed}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        raise ValueError(f"{owner}: {name}={value!r} is out of range; allowed: {allowed}")
    return float(value)


def check_scale(owner: str, name: str, scale: Scale) -> Scale:
    """A scale is None (the call's own), a number, a per-step list of numbers, or a callable."""
    if scale is None or callable(scale):
        return scale
    if hasattr(scale, "tolist") and getattr(scale, "ndim", 0) == 1:  # a 1-D numpy array / tensor: per step
        scale = scale.tolist()
    if isinstance(scale, (list, tuple)):
        if not scale:
            raise ValueError(f"{owner}: {name}=[] is empty; allowed: one number per sampling step")
        return [check_range(owner, f"{name}[{i}]", s) for i, s in enumerate(scale)]
    return check_range(owner, name, scale)


def resolve_scale(owner: str, name: str, scale: Scale, ctx: StepContext) -> float:
    """The scale to use at this step."""
    if scale is None:
        if ctx.guidance_scale is None:
            raise ValueError(
                f"{owner}: {name}=None takes the pipeline call's guidance_scale, but none is known here; "
                f"pass {name}=<number> to the strategy"
            )
        return float(ctx.guidance_scale)
    if isinstance(scale, list):
        if len(scale) != ctx.num_steps:
            raise ValueError(
                f"{owner}: {name} has {len(scale)} entries but this call makes {ctx.num_steps} "
                "guided evaluations; allowed: exactly one scale per evaluation"
            )
        return scale[ctx.step]
    if callable(scale):
        return float(scale(ctx))
    return scale


class GuidanceStrategy:
    """Base class of every guidance rule.

    Subclasses set `space` ("model": raw model output; "x0": denoised estimate) and implement
    `guide(ctx, preds)` in that space; `combine` does the conversions. Per-sample state lives on
    the instance and is cleared by `reset()`, which the hook calls at the start of every pipeline
    call. `config_fields` lists the constructor arguments that `to_config()` records.
    """

    space: ClassVar[str] = "model"
    config_fields: ClassVar[tuple[str, ...]] = ()
    uses_guide_model: ClassVar[bool] = False  # may ask for the GUIDE branch (the caller must supply a guide model)
    perturbation: Perturbation | None = None  # set by rules that may ask for the PERTURBED branch

    # --- per-call protocol -------------------------------------------------------------------
    def on_call(self, call: "CallDescription") -> None:
        """Optional check at the start of every pipeline call, before `reset()`.

        The diffusers hook passes a plain `guidance.call.CallDescription` (pipeline and scheduler
        class names, step count, batch layout, negative prompt, dtype, a decode function, ...):
        guidance/ never reads the pipeline object. A strategy that depends on the call, such as
        LinearAG with coefficients fitted for one pipeline, scheduler and step count, validates here
        and raises ValueError to refuse it. The default forwards to wrapped strategies
        (`config_fields` holding a GuidanceStrategy), so wrappers such as Interval need no override.
        Custom loops may skip it or build a CallDescription themselves.
        """
        for child in self.wrapped_strategies():
            child.on_call(call)

    def wrapped_strategies(self) -> list["GuidanceStrategy"]:
        """The strategies this one wraps (its `config_fields` holding a GuidanceStrategy: Interval's inner, ...)."""
        return [c for c in (getattr(self, f, None) for f in self.config_fields) if isinstance(c, GuidanceStrategy)]

    @property
    def sets_rescale(self) -> bool:
        """True when this rule applies a CFG-rescale of its own (`CFG(guidance_rescale=phi)`, `Rescale`), which
        replaces the call's `guidance_rescale`; wrappers ask the strategies they hold."""
        return any(child.sets_rescale for child in self.wrapped_strategies())

    # --- per-step protocol -------------------------------------------------------------------
    def reset(self) -> None:
        """Forget per-sample state (momentum, switch flags, ...): a new generation starts."""

    def branches(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Which samples need which model evaluation at this step (bool masks of shape (B,)).

        Keys: COND (every sample), UNCOND, REF (with `reference_labels`), GUIDE (the guide model at the
        conditional inputs; set `uses_guide_model = True` so callers check for a guide model up front),
        PERTURBED (the denoiser at the conditional inputs with `perturbation` active)."""
        return {COND: ctx.all(), UNCOND: ctx.all()}

    def reference_labels(self, ctx: StepContext) -> torch.Tensor:
        """Class id per sample (B,) for the REF branch; asked only by strategies that request it."""
        raise NotImplementedError(f"{type(self).__name__} requests a '{REF}' branch but defines no reference_labels()")

    def combine(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Guided prediction in the model's output space, (B, ...).

        `preds[name]` holds the model output of each branch for all B samples; rows of samples
        that did not need that branch (see `ctx.evaluated`) are NaN so that misuse is loud. The
        result has the dtype of `preds[COND]`; x0-space rules compute in float32 before that cast.
        """
        if self.space == "x0":
            # x0 in float32 (see guidance.parametrization); only the returned prediction is cast.
            x0 = {name: ctx.to_x0(p) for name, p in preds.items()}
            return ctx.from_x0(self.guide(ctx, x0)).to(preds[COND].dtype)
        return self.guide(ctx, preds)

    def guide(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # --- configuration --------------------------------------------------------------------------
    def to_config(self) -> dict:
        """{"name": ..., "params": {...}}: JSON-serialisable, rebuilt by `from_config`."""
        params = {}
        for f in self.config_fields:
            value = getattr(self, f)
            if isinstance(value, GuidanceStrategy) or hasattr(value, "to_config"):
                value = value.to_config()
            elif callable(value):
                raise ValueError(
                    f"{type(self).__name__}: {f}={value!r} is a callable and cannot be serialised; "
                    "use a number, a per-step list, or a guidance.schedules schedule"
                )
            params[f] = value
        return {"name": type(self).__name__, "params": params}

    def __repr__(self) -> str:
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.config_fields)
        return f"{type(self).__name__}({args})"


class TwoBranchRule(GuidanceStrategy):
    """A rule on (cond, uncond) with one scale w that is the conditional model alone at w = 1 (at w = 0 with
    `use_original_formulation`, diffusers' c + w (c - u)); there, as diffusers' guiders do, it returns the
    conditional prediction and asks for no unconditional pass. Subclasses set `scale` and
    `use_original_formulation` and check `is_off(w)` in `guide`."""

    scale: Scale = None
    use_original_formulation: bool = False

    def current_scale(self, ctx: StepContext) -> float:
        return resolve_scale(type(self).__name__, "scale", self.scale, ctx)

    def is_off(self, w: float) -> bool:
        return math.isclose(w, 0.0 if self.use_original_formulation else 1.0)

    def branches(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        off = self.is_off(self.current_scale(ctx))
        return {COND: ctx.all(), UNCOND: ctx.none() if off else ctx.all()}


def guided_prediction(strategy: GuidanceStrategy, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One guided step as a pipeline makes it: `strategy.combine`, then the call's `guidance_rescale`
    (`ctx.guidance_rescale`) applied to whatever the rule returned, as diffusers pipelines apply
    `rescale_noise_cfg` after their CFG, unless the strategy sets a rescale of its own (`sets_rescale`).
    Callers (our hook, StrategyGuider, custom loops) use this rather than `combine`, so that the call's
    rescale holds for every rule, not only CFG."""
    guided = strategy.combine(ctx, preds)
    phi = ctx.guidance_rescale
    if phi > 0 and not strategy.sets_rescale:
        from .cfg import rescale_to_cond_std  # cfg imports this module

        guided = rescale_to_cond_std(guided, preds[COND], phi).to(guided.dtype)
    return guided


def register_strategy(cls: type[GuidanceStrategy], name: str | None = None) -> type[GuidanceStrategy]:
    """Let configs name `cls` (by `name`, default its class name). A name already taken by another
    class is an error, so registering never silently replaces a strategy. Usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, GuidanceStrategy)):
        raise ValueError(f"register_strategy: cls={cls!r} is not a GuidanceStrategy subclass")
    name = cls.__name__ if name is None else name
    if REGISTRY.get(name, cls) is not cls:
        raise ValueError(f"register_strategy: name={name!r} is already registered for {REGISTRY[name].__module__}."
                         f"{REGISTRY[name].__qualname__}; allowed: a name not in {sorted(REGISTRY)}")
    REGISTRY[name] = cls
    return cls


MAX_CONFIG_DEPTH = 32  # strategies nested deeper than any real composition: a generated or corrupt config


def from_config(config: Mapping | str, where: str = "config", _depth: int = 0) -> GuidanceStrategy:
    """Rebuild a strategy from `to_config()` output (a dict or its JSON text)."""
    if _depth > MAX_CONFIG_DEPTH:
        raise ValueError(f"{where.split(' params.')[0]}: strategies nested more than {MAX_CONFIG_DEPTH} deep; "
                         f"allowed: at most {MAX_CONFIG_DEPTH} levels of wrapping (Interval(Rescale(...)) is two)")
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}={config[:80]!r} is not valid JSON: {e}") from None
        except RecursionError:
            raise ValueError(f"{where}={config[:80]!r}...: nested too deep to read; allowed: at most "
                             f"{MAX_CONFIG_DEPTH} levels of wrapping") from None
    if not isinstance(config, Mapping) or "name" not in config:
        raise ValueError(f"{where}={config!r} is malformed; allowed: a mapping with 'name' and optional 'params'")
    unknown = sorted(set(config) - {"name", "params"}, key=str)
    if unknown:  # a misplaced parameter must not be dropped without a word
        raise ValueError(f"{where} has unknown keys {unknown}; allowed: 'name' and 'params' "
                         '(parameters go inside "params")')
    name = config["name"]
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"{where} name={name!r} is not a known strategy; allowed: {', '.join(sorted(REGISTRY))}")
    params = config.get("params")
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"{where} params={params!r} is a {type(params).__name__}; allowed: a mapping of keyword "
                         f"arguments of {name}")
    params = dict(params or {})
    for key, value in params.items():
        if isinstance(value, Mapping) and "name" in value:  # a nested strategy (Interval's inner, ...)
            params[key] = from_config(value, f"{where} params.{key}", _depth + 1)
        elif isinstance(value, Mapping) and value.get("schedule"):
            from .schedules import Schedule

            params[key] = Schedule.from_config(value, f"{where} params.{key}")
    try:
        return REGISTRY[name](**params)
    except TypeError as e:
        raise ValueError(f"{where} for {name} has invalid params {sorted(params)}: {e}") from None
