"""`StrategyGuider`: any guidance-kit strategy as a diffusers guider (`diffusers.guiders.BaseGuidance`).

Modular pipelines (SDXL, SD3, Flux, Qwen-Image, Wan, LTX, ...) and the pipelines that take a `guider`
component do not run their own CFG formula: at every step they call

    guider.set_state(step, num_inference_steps, timestep)
    batches = guider.prepare_inputs(...)              # one batch per branch the guider wants
    for batch in batches:
        guider.prepare_models(denoiser); batch.noise_pred = denoiser(...); guider.cleanup_models(denoiser)
    pred = guider(batches)[0]                         # forward(pred_cond, pred_uncond)

so a guider is the natural place for our strategies there (no hook needed):

    pipe.update_components(guider=StrategyGuider(APG(eta=0, norm_threshold=15, momentum=-0.5),
                                                 scheduler=pipe.scheduler))

What a strategy is given, and where it comes from:
- the StepContext's step / timestep: `set_state`; its step count: `len(scheduler.timesteps)` (the
  evaluations a multi-evaluation solver makes) when the scheduler is bound, else `num_inference_steps`;
- the model input x_t: read from the denoiser's own call (a forward pre-hook installed by
  `prepare_models`, removed by `cleanup_models`; it records, it never changes the call);
- the noise level (alpha, sigma) of that input, which x0-space rules (APG paper mode, AG in eps
  space, sigma intervals) need: the scheduler, which a guider is not given, so it is a constructor
  argument (`scheduler=pipe.scheduler`, or `.bind(scheduler)`). Without it such a rule stops at its
  first use with an error that says so; CFG-like rules never need it.

Branches are chosen before the denoiser runs (`prepare_inputs`, from `strategy.branches`): a step where
no sample needs its unconditional branch runs one batch (an Interval outside its window saves the NFE,
as diffusers' own guiders do outside `start`/`stop`). A diffusers guider evaluates whole batches, so a
step where only some samples need it runs the unconditional batch for all; the rows of the others are
NaN in what the strategy receives, as the strategy contract says.

A perturbed-denoiser branch (PAG, SLG, SEG) is one more batch on the conditional inputs, run with the
perturbation placed in `prepare_models` and removed in `cleanup_models` (as diffusers' PAG / SLG / SEG guiders
do), counted in `perturbed_nfe_per_sample`.

Refused at construction: strategies that need what a guider never sees: a reference-class branch
(GFCG, PerpNeg), a guide model, or the pipeline call itself through `on_call` (LinearAG's fitted call, DynamicCFG's prompts and
decoder, classifier guidance's decoder and labels). Use those through `apply_guidance`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from guidance.base import (COND, PERTURBED, UNCOND, GuidanceStrategy, StepContext, check_range, from_config,
                           guided_prediction)
from guidance.parametrization import Parametrization

from .branches.perturbed import Perturber
from .parametrization import build_step_context, step_parametrization

NO_SCHEDULER = (
    "StrategyGuider: {name} needs the noise level of each step (it converts predictions to x0 or reads sigma), "
    "which diffusers does not give a guider; pass the pipeline's scheduler: StrategyGuider(strategy, "
    "scheduler=pipe.scheduler) or guider.bind(pipe.scheduler)"
)


def _nodes(strategy: GuidanceStrategy):
    """The strategy and every strategy it wraps (Interval(APG()) -> Interval, APG)."""
    yield strategy
    for f in strategy.config_fields:
        child = getattr(strategy, f, None)
        if isinstance(child, GuidanceStrategy):
            yield from _nodes(child)


def check_guidable(strategy: GuidanceStrategy) -> None:
    """Refuse a strategy that needs what a diffusers guider is never given."""
    for node in _nodes(strategy):
        kind = type(node)
        if kind.reference_labels is not GuidanceStrategy.reference_labels:
            what = "a reference-class branch (class ids to swap), which guider pipelines do not have"
        elif getattr(node, "uses_guide_model", False):
            what = "a guide model's prediction (autoguidance), which a diffusers guider cannot evaluate"
        elif kind.on_call is not GuidanceStrategy.on_call:
            what = ("the pipeline call itself (on_call: its pipeline, prompts, decoder or labels), which a guider "
                    "never sees")
        elif getattr(node.perturbation, "kind", None) == "nag":
            what = ("the negative prompt's text stream inside the denoiser's own conditional pass (NAG), which a "
                    "guider's batches do not carry")
        elif getattr(node.perturbation, "kind", None) == "self_attention_blur":
            what = ("an input degraded from the step's own predictions and self-attention map (SAG), which a guider "
                    "cannot build between its batches")
        else:
            continue
        raise ValueError(f"StrategyGuider: strategy={strategy!r} cannot run as a diffusers guider: {kind.__name__} "
                         f"needs {what}; run it through pipelines.apply_guidance on a standard pipeline instead")


def _first_tensor(values) -> torch.Tensor | None:
    for v in values:
        v = v[0] if isinstance(v, tuple) else v
        if torch.is_tensor(v):
            return v
    return None


class StrategyGuider(BaseGuidance):
    """A diffusers guider that runs a guidance-kit strategy.

    strategy: a `GuidanceStrategy`, or its `to_config()` dict (what `save_pretrained` stores).
    guidance_scale: the scale a strategy with `scale=None` takes (modular pipelines have no call-level
    `guidance_scale`; it is a guider setting there, as in diffusers' ClassifierFreeGuidance).
    guidance_rescale: the call-level rescale a `CFG(guidance_rescale=None)` takes, phi in [0, 1].
    enabled: as diffusers' guiders (pipelines disable guidance for guidance-distilled UNets).
    scheduler: the pipeline's scheduler, for rules that need the noise level (not saved in the config).

    After a call, `nfe_per_sample` is the number of denoiser evaluations each sample received.
    """

    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_perturbed"]
    ignore_for_config = ["scheduler"]

    @register_to_config
    def __init__(self, strategy: GuidanceStrategy | dict | None = None, guidance_scale: float = 7.5,
                 guidance_rescale: float = 0.0, enabled: bool = True, scheduler: Any = None):
        super().__init__(0.0, 1.0, enabled)  # windows are strategies here (Interval), not guider settings
        if strategy is None:
            raise ValueError("StrategyGuider: strategy=None; allowed: a guidance.GuidanceStrategy or its to_config()")
        if isinstance(strategy, dict):
            strategy = from_config(strategy)
        if not isinstance(strategy, GuidanceStrategy):
            raise ValueError(f"StrategyGuider: strategy={strategy!r} is not a guidance.GuidanceStrategy or its config")
        check_guidable(strategy)
        self.strategy = strategy
        self.guidance_scale = check_range("StrategyGuider", "guidance_scale", guidance_scale)
        self.guidance_rescale = check_range("StrategyGuider", "guidance_rescale", guidance_rescale, 0.0, 1.0)
        self.register_to_config(strategy=strategy.to_config())  # JSON, so save_pretrained can write it
        self.scheduler = None
        self.bind(scheduler)
        self._solver: dict = {}  # build_step_context's per-call state
        self._plan: tuple[StepContext, dict[str, torch.Tensor]] | None = None  # this step's context and masks
        self._x: torch.Tensor | None = None  # the denoiser input of this step
        self._capture_handle = None
        self._nfe = 0
        self._perturbed_nfe = 0
        perturbations = {n.perturbation for n in _nodes(strategy) if n.perturbation is not None}
        if len(perturbations) > 1:
            raise ValueError(f"StrategyGuider: strategy={strategy!r} asks for several perturbations; allowed: one")
        self._perturbation = perturbations.pop() if perturbations else None
        self._perturber: Perturber | None = None  # made at the first denoiser call (the guider meets it there)
        self._batches: list[tuple[int, str]] = []  # this step's batches: (inputs: 0 cond / 1 uncond, prediction)
        self._perturbing = None  # the perturbation's context while its batch runs

    # --- configuration ---------------------------------------------------------------------------
    def bind(self, scheduler: Any) -> "StrategyGuider":
        """Give the guider the pipeline's scheduler (None: unbind). Returns self."""
        if scheduler is not None and not hasattr(scheduler, "timesteps"):
            raise ValueError(f"StrategyGuider: scheduler={scheduler!r} is not a diffusers scheduler")
        self.scheduler = scheduler
        return self

    @classmethod
    def from_pretrained(cls, *args, scheduler: Any = None, **kwargs) -> "StrategyGuider":
        return super().from_pretrained(*args, **kwargs).bind(scheduler)

    def new(self, **kwargs) -> "StrategyGuider":
        """A copy with some settings changed; keeps the bound scheduler unless `scheduler=` is given."""
        scheduler = kwargs.pop("scheduler", self.scheduler)
        return self.__class__.from_config(self.config, **kwargs).bind(scheduler)

    # --- per step ----------------------------------------------------------------------------------
    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        self._plan = None
        self._x = None
        if step == 0:  # a new pipeline call
            self.strategy.reset()
            self._solver = {}
            self._nfe = 0
            self._perturbed_nfe = 0

    def _context(self, batch: int, device: torch.device) -> StepContext:
        """This step's context. The model input is not known yet (branches are chosen before the
        denoiser runs): x is a NaN stand-in, replaced by the real input in `forward`."""
        stand_in = torch.full((batch, 1), float("nan"), device=device)
        if self.scheduler is not None:
            self._solver.update(step=self._step, scale=self.guidance_scale, rescale=self.guidance_rescale)
            return build_step_context(self.scheduler, self._solver, stand_in, self._timestep)
        t = torch.as_tensor(self._timestep).flatten()[0].item() if self._timestep is not None else float("nan")
        return StepContext(self._step, self._num_inference_steps, t, self._no_noise_level(stand_in),
                           self.guidance_scale, self.guidance_rescale)

    def _no_noise_level(self, x: torch.Tensor) -> Parametrization:
        nan = torch.full((x.shape[0],) + (1,) * (x.ndim - 1), float("nan"), dtype=torch.float64, device=x.device)
        reason = NO_SCHEDULER.format(name=type(self.strategy).__name__)
        return Parametrization("sample", x, nan, nan, unavailable=reason)

    def _make_plan(self, reference: torch.Tensor | None) -> None:
        if self._plan is not None:
            return
        if reference is None:
            raise ValueError("StrategyGuider: the guider inputs hold no tensor, so the batch size is unknown")
        ctx = self._context(reference.shape[0], reference.device)
        masks = self.strategy.branches(ctx)
        unknown = set(masks) - {COND, UNCOND, PERTURBED}
        if unknown:
            raise NotImplementedError(f"StrategyGuider: branches {sorted(unknown)} are not supported by a guider")
        if not bool(masks[COND].all()):
            raise NotImplementedError(f"{type(self.strategy).__name__}: every sample needs its conditional branch")
        plan = {COND: masks[COND], UNCOND: masks.get(UNCOND, ctx.none()), PERTURBED: masks.get(PERTURBED, ctx.none())}
        self._plan = (ctx, plan)
        # The batches this step runs: a guider runs whole batches, so a branch some sample asks for runs for all.
        self._batches = [(0, "pred_cond")] + [(1, "pred_uncond")] * bool(plan[UNCOND].any()) \
            + [(0, "pred_cond_perturbed")] * bool(plan[PERTURBED].any())

    @property
    def num_conditions(self) -> int:
        """Batches this step runs: 2 while no step is planned (the pipeline asks before sampling whether
        to encode the negative prompt), else the conditional one, the unconditional one where some sample needs
        it, and the perturbed one (the conditional inputs, the denoiser perturbed) where some sample asks."""
        if not self._enabled:
            return 1
        return 2 if self._plan is None else len(self._batches)

    @property
    def is_conditional(self) -> bool:
        """Whether the batch being prepared has the conditional inputs (the conditional and perturbed ones)."""
        index = self._count_prepared - 1
        if self._enabled and self._plan is not None and 0 <= index < len(self._batches):
            return self._batches[index][0] == 0
        return self._count_prepared == 1  # the conditional batch runs first, as in ClassifierFreeGuidance

    def prepare_inputs(self, data: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list:
        if self._enabled:
            self._make_plan(_first_tensor(data.values()))
        if not self._enabled:
            return [self._prepare_batch(data, 0, "pred_cond")]
        return [self._prepare_batch(data, i, name) for i, name in self._batches]

    def prepare_inputs_from_block_state(self, data, input_fields: dict[str, str | tuple[str, str]]) -> list:
        if self._enabled:
            latents = getattr(data, "latents", None)
            fields = (getattr(data, v if isinstance(v, str) else v[0], None) for v in input_fields.values())
            self._make_plan(latents if torch.is_tensor(latents) else _first_tensor(fields))
        if not self._enabled:
            return [self._prepare_batch_from_block_state(input_fields, data, 0, "pred_cond")]
        return [self._prepare_batch_from_block_state(input_fields, data, i, name) for i, name in self._batches]

    # --- reading the model input x_t from the denoiser's own call -----------------------------------
    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        super().prepare_models(denoiser)
        index = self._count_prepared - 1  # the batch about to run, in the order of `_batches`
        if self._enabled and index < len(self._batches) and self._batches[index][1] == "pred_cond_perturbed":
            if self._perturber is None or self._perturber.denoiser is not denoiser:
                self._perturber = Perturber(denoiser, self._perturbation, type(self.strategy).__name__)
            self._perturbing = self._perturber.active()
            self._perturbing.__enter__()
            self._perturbed_nfe += 1
        else:
            self._nfe += 1
        if self._x is None and self._capture_handle is None:
            first = list(inspect.signature(type(denoiser).forward).parameters)[1]

            def capture(module, args, kwargs):
                self._x = args[0] if args else kwargs.get(first)

            self._capture_handle = denoiser.register_forward_pre_hook(capture, with_kwargs=True)

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._perturbing is not None:
            self._perturbing, perturbing = None, self._perturbing
            perturbing.__exit__(None, None, None)
        if self._capture_handle is not None:
            self._capture_handle.remove()
            self._capture_handle = None

    @staticmethod
    def _model_input(x: Any, pred: torch.Tensor) -> torch.Tensor | None:
        """x_t in the prediction's shape, read from the denoiser's first input, or None where it cannot be.
        - a list of per-sample inputs (Z-Image's `x=[(C, 1, H, W), ...]`, whose prediction the block stacks
          and squeezes): stacked, reshaped when it holds as many numbers as the prediction;
        - an input larger than the prediction along one dimension only (conditioning concatenated after the
          noisy latents, the diffusers convention: HunyuanVideo 1.5's [latents, image latents, mask] on
          channels, Wan I2V's on channels, Flux.2 / Kontext image tokens on the sequence): its leading part."""
        if isinstance(x, (list, tuple)) and x and all(torch.is_tensor(v) for v in x):
            x = torch.stack(list(x))
            return x.reshape(pred.shape) if x.numel() == pred.numel() else None
        if not torch.is_tensor(x) or x.ndim != pred.ndim:
            return None
        larger = [d for d in range(x.ndim) if x.shape[d] != pred.shape[d]]
        if not larger:
            return x
        if len(larger) == 1 and x.shape[larger[0]] > pred.shape[larger[0]]:
            return x.narrow(larger[0], 0, pred.shape[larger[0]])
        return None

    def _parametrization(self, pred: torch.Tensor) -> Parametrization:
        x = self._x
        if self.scheduler is None:
            return self._no_noise_level(x if torch.is_tensor(x) else pred)
        x = self._model_input(x, pred)
        if x is None:
            shape = tuple(self._x.shape) if torch.is_tensor(self._x) else None
            param = self._no_noise_level(pred)
            param.unavailable = (f"StrategyGuider: the denoiser's input {shape} does not match the shape of its "
                                 f"prediction {tuple(pred.shape)}, so x_t is unknown and "
                                 f"{type(self.strategy).__name__} cannot convert to x0 here")
            return param
        return step_parametrization(self.scheduler, self._timestep, x, self._solver.setdefault("tables", {}))

    # --- combining -----------------------------------------------------------------------------------
    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None,
                pred_cond_perturbed: torch.Tensor | None = None) -> GuiderOutput:
        if not self._enabled:
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        if self._plan is None:
            raise RuntimeError("StrategyGuider.forward was called before prepare_inputs for this step; a guider is "
                               "used as set_state(...), prepare_inputs(...), the denoiser calls, then forward(...)")
        plan_ctx, masks = self._plan
        ctx = dataclasses.replace(plan_ctx, param=self._parametrization(pred_cond))
        ctx.evaluated = masks
        uncond = masks[UNCOND].view(-1, *[1] * (pred_cond.ndim - 1))
        if pred_uncond is None:
            preds = {COND: pred_cond, UNCOND: torch.full_like(pred_cond, float("nan"))}
        else:  # rows of samples that did not ask for it are NaN (the strategy contract)
            not_evaluated = torch.full_like(pred_uncond, float("nan"))
            preds = {COND: pred_cond, UNCOND: torch.where(uncond, pred_uncond, not_evaluated)}
        if self._perturbation is not None:
            perturbed = masks[PERTURBED].view(-1, *[1] * (pred_cond.ndim - 1))
            preds[PERTURBED] = torch.full_like(pred_cond, float("nan")) if pred_cond_perturbed is None else \
                torch.where(perturbed, pred_cond_perturbed, torch.full_like(pred_cond_perturbed, float("nan")))
        pred = guided_prediction(self.strategy, ctx, preds).to(pred_cond.dtype)  # with the guider's rescale
        self._plan = None
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    @property
    def nfe_per_sample(self) -> int:
        """Denoiser evaluations each sample received in the current (or last) pipeline call (conditional and
        unconditional batches; the perturbed ones are `perturbed_nfe_per_sample`)."""
        return self._nfe

    @property
    def perturbed_nfe_per_sample(self) -> int:
        return self._perturbed_nfe

    def get_state(self) -> dict[str, Any]:
        return {**super().get_state(), "strategy": repr(self.strategy), "nfe_per_sample": self._nfe}
