"""Dynamic CFG via online feedback (Papalampidi et al. 2025, arXiv 2509.16131).

At every step the guidance scale of each sample is chosen greedily from a small candidate set:
for each candidate scale s the guided prediction g_s = u + s (c - u) is turned into the candidate
next latent by the pipeline's own scheduler (no extra denoiser evaluation), a weighted set of
evaluators scores every candidate, and each sample keeps the prediction of its best candidate.

Correctness of the candidates (see methods.md §4.4):
* the scheduler is deep-copied before each candidate step, so multistep solvers (DPM-Solver++,
  UniPC) keep their history; only the pipeline's own step, on the winning prediction, commits state;
* stochastic schedulers (DDPM, Euler ancestral, DDIM with eta > 0) draw the same noise for every
  candidate: the generator states (the call's `generator`, one or a list, and the global RNG) are
  saved before and restored after each candidate step, so the pipeline's real step draws the very
  noise the winning candidate was scored with.

No diffusers import: the scheduler (an opaque object stepped on copies) and the call's generator come
from `on_call` (the hook's `CallDescription`), or from `bind(scheduler, generator, eta)` in a custom loop.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Mapping, Sequence

import torch

from .base import COND, UNCOND, GuidanceStrategy, StepContext, check_range
from .call import CallDescription
from .evaluators import DEFAULT_EVALUATORS, NAMED_EVALUATORS, SPACES, resolve_evaluator

PAPER_SCALES = (1.0, 3.0, 7.5, 11.0, 15.0)  # the paper's LDM candidate set [S]
WEIGHTINGS = ("adaptive", "signed", "fixed")
NORMALIZATIONS = ("none", "candidates")

EvaluatorLike = str | Callable


class DynamicCFG(GuidanceStrategy):
    """Per-sample, per-step CFG scale chosen by evaluators scoring candidate next latents.

    scales: candidate Ho-Salimans scales (default the paper's LDM set 1, 3, 7.5, 11, 15 [S]).
    evaluators: names of registered evaluators (the embedded model's, registered by `pipelines`:
        "alignment": noise-aware classifier, "quality": noise-aware real-vs-generated
        discriminator; loaded on first use) and/or evaluator objects or callables
        `f(x, timestep, condition) -> (B,)` with a `space` attribute ("latent", the default, or
        "x0"); see `guidance.evaluators`. None (default): chosen per call from the pipeline kind:
        the evaluators registered for that pipeline class (the embedded class-conditional model:
        alignment + quality), on text-to-image pipelines a registered "clip" evaluator (CLIP on the
        decoded x0; no CLIP weights ship offline, so register one), else a clear error. Only names
        survive `to_config()`; a strategy holding objects refuses to serialise.
    weights: base weight of each evaluator (default 1 each). With weighting="fixed" the score is
        sum_e weights[e] * score_e (the paper's "linear weights").
    weighting: "adaptive" (default, the paper's best row) weights each evaluator by the relative
        change of its score, alpha_e = |e_t - e_{t+1}| / max(|e_{t+1}|, eps), times its base weight,
        normalised to sum 1 per sample. Our reading of the unspecified bookkeeping [U]: e_{t+1} is
        the score of the candidate chosen at the previous step, e_t the mean score over this step's
        candidates; the absolute value keeps the weights non-negative (a falling score should not
        turn an evaluator into one to minimise); the first step uses the base weights.
        "signed" is the paper's Eq. 7 as written, alpha_e = (e_t - e_{t+1}) / e_{t+1} (denominator
        guarded by eps, sign kept), times the base weight, not normalised: an evaluator whose score
        fell relative to its own size gets a negative weight.
    eps: floor of |e_{t+1}| in the relative change, the guard against division by ~0.
    normalize: "none" (default, scores used as they are) or "candidates" (z-score each evaluator's
        scores over the candidates of each sample before weighting, so that evaluators on
        different scales compete evenly); the paper does not say [U].

    After a call, `history` holds the chosen scale per sample and step, (B, steps);
    `score_history` the chosen candidate's score per evaluator, (B, steps, E); `weight_history`
    the weights used, (B, steps, E). `plot_schedules(strategy.history, labels)` draws them.

    Multi-stage solvers (Heun, DPM-Solver 2S/SDE, KDPM2: scheduler.order > 1) are refused: their
    intermediate evaluations do not produce a next latent to score.
    """

    config_fields = ("scales", "evaluators", "weights", "weighting", "eps", "normalize")

    def __init__(self, scales: Sequence[float] = PAPER_SCALES,
                 evaluators: Sequence[EvaluatorLike] | None = None,
                 weights: Sequence[float] | None = None, weighting: str = "adaptive", eps: float = 0.1,
                 normalize: str = "none"):
        if isinstance(scales, (int, float)) or not len(scales):
            raise ValueError(f"DynamicCFG: scales={scales!r} is invalid; allowed: a non-empty list of numbers")
        self.scales = [check_range("DynamicCFG", f"scales[{i}]", s) for i, s in enumerate(scales)]
        if isinstance(evaluators, (str, bytes)) or callable(evaluators):
            evaluators = [evaluators]
        self.evaluators = None if evaluators is None else list(evaluators)
        if self.evaluators is not None:
            self._check_evaluators(self.evaluators)
        if weights is None:
            self.weights = None
        else:
            if self.evaluators is not None and len(weights) != len(self.evaluators):
                raise ValueError(f"DynamicCFG: weights has {len(weights)} entries for {len(self.evaluators)} "
                                 "evaluators; allowed: one non-negative weight per evaluator")
            self.weights = [check_range("DynamicCFG", f"weights[{i}]", w, 0) for i, w in enumerate(weights)]
            if not sum(self.weights) > 0:
                raise ValueError(f"DynamicCFG: weights={weights!r} are all zero; allowed: at least one > 0")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"DynamicCFG: weighting={weighting!r} is unknown; allowed: {', '.join(WEIGHTINGS)}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"DynamicCFG: normalize={normalize!r} is unknown; allowed: {', '.join(NORMALIZATIONS)}")
        self.weighting, self.normalize = weighting, normalize
        self.eps = check_range("DynamicCFG", "eps", eps, 0, low_open=True)
        self._loaded: list[Callable] | None = None
        self._names: list | None = self.evaluators  # what _loaded holds (evaluators=None: chosen per call)
        self._decode: Callable | None = None  # the call's x0 -> image decode, for x0 evaluators without one
        self._scheduler = None
        self._step_kwargs: dict = {}
        self._prompts: list[str] | None = None
        self.reset()

    @staticmethod
    def _check_evaluators(evaluators: list) -> None:
        if not evaluators:
            raise ValueError("DynamicCFG: evaluators=[] is empty; allowed: None (per pipeline), names of registered "
                             f"evaluators ({', '.join(sorted(NAMED_EVALUATORS)) or 'none: import pipelines'}), or "
                             "evaluator objects / callables")
        for i, e in enumerate(evaluators):
            if isinstance(e, str) and e not in NAMED_EVALUATORS:
                raise ValueError(f"DynamicCFG: evaluators[{i}]={e!r} is not a registered evaluator; allowed: "
                                 f"{', '.join(sorted(NAMED_EVALUATORS)) or '(none registered: import pipelines)'}, "
                                 "or an evaluator object / callable")
            if not isinstance(e, str) and not callable(e):
                raise ValueError(f"DynamicCFG: evaluators[{i}]={e!r} is neither a name nor callable")
            if getattr(e, "space", "latent") not in SPACES:
                raise ValueError(f"DynamicCFG: evaluators[{i}].space={e.space!r}; allowed: {', '.join(SPACES)}")

    # --- per call ------------------------------------------------------------------------------------
    def default_evaluators(self, call: CallDescription) -> list[str]:
        """The evaluators for this pipeline kind when none were given (see the class docstring)."""
        if call.pipeline in DEFAULT_EVALUATORS:
            return list(DEFAULT_EVALUATORS[call.pipeline])
        if call.conditioning == "text":
            if "clip" in NAMED_EVALUATORS:
                return ["clip"]
            raise ValueError(
                f"DynamicCFG: evaluators=None on the text-to-image pipeline {call.pipeline} uses a CLIP evaluator, "
                "but none is registered (no CLIP weights ship offline); register one with "
                "guidance.evaluators.register_evaluator('clip', lambda device: CLIPEvaluator(model, tokenizer)) or "
                "pass evaluators=[CLIPEvaluator(model, tokenizer)]"
            )
        raise ValueError(
            f"DynamicCFG: evaluators=None, and no evaluators are registered for {call.pipeline} "
            f"({call.conditioning}-conditional; shipped defaults exist for: "
            f"{', '.join(sorted(DEFAULT_EVALUATORS)) or 'none'}); "
            "pass evaluators=[...] trained for this model (see guidance.evaluators)"
        )

    def on_call(self, call: CallDescription) -> None:
        if not call.steps_denoiser_output:
            raise ValueError(f"DynamicCFG: {call.pipeline} hands its scheduler a transform of the denoiser's output "
                             "(its own preconditioning, an x0-to-velocity conversion, or the negation of what the "
                             "strategy sees), so a scheduler copy stepped with the guided output would "
                             "not take the pipeline's step; allowed: pipelines that step the denoiser's output")
        names = self.evaluators if self.evaluators is not None else self.default_evaluators(call)
        if self.weights is not None and len(self.weights) != len(names):
            raise ValueError(f"DynamicCFG: weights has {len(self.weights)} entries for the {len(names)} evaluators "
                             f"{names} of this call; allowed: one non-negative weight per evaluator")
        if self._loaded is None or self._names != names:
            self._names, self._loaded = list(names), None
        self._decode = call.decode
        if call.scheduler is not None:  # else a custom loop binds it itself
            self.bind(call.scheduler, call.generator, call.eta, None if call.prompts is None else list(call.prompts))

    def bind(self, scheduler: Any, generator: Any = None, eta: float | None = None,
             prompts: list[str] | None = None) -> "DynamicCFG":
        """Use this scheduler (stepped on copies only) and the call's generator/eta for the candidates.

        The hook does this in `on_call`; custom loops call it before sampling. Like the diffusers
        pipelines, `generator` and `eta` are passed to `scheduler.step` only where it accepts them."""
        if getattr(scheduler, "order", 1) != 1:
            raise ValueError(f"DynamicCFG: scheduler={type(scheduler).__name__} has order {scheduler.order}; "
                             "allowed: single-evaluation schedulers (order 1: DDIM, DDPM, Euler, Euler ancestral, "
                             "DPM-Solver++ multistep, UniPC, flow-matching Euler)")
        params = set(inspect.signature(scheduler.step).parameters)
        self._scheduler = scheduler
        self._step_kwargs = {}
        if "generator" in params:
            self._step_kwargs["generator"] = generator
        if "eta" in params and eta is not None:
            self._step_kwargs["eta"] = eta
        self._prompts = prompts
        return self

    def reset(self) -> None:
        self._prev: torch.Tensor | None = None  # (B, E): the chosen candidate's scores at the previous step
        self._chosen: list[torch.Tensor] = []
        self._scores: list[torch.Tensor] = []
        self._weights: list[torch.Tensor] = []

    @property
    def history(self) -> torch.Tensor | None:
        """Chosen scale per sample and step, (B, steps), of the last call."""
        return torch.stack(self._chosen, dim=1) if self._chosen else None

    @property
    def score_history(self) -> torch.Tensor | None:
        return torch.stack(self._scores, dim=1) if self._scores else None

    @property
    def weight_history(self) -> torch.Tensor | None:
        return torch.stack(self._weights, dim=1) if self._weights else None

    # --- one step ------------------------------------------------------------------------------------
    def combine(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cond, uncond = preds[COND], preds[UNCOND]
        guided = torch.stack([uncond + s * (cond - uncond) for s in self.scales])  # (K, B, ...), CFG's order
        scores = self.score_candidates(ctx, guided)  # (K, B, E)
        weights = self.evaluator_weights(scores)  # (B, E)
        total = (self._normalized(scores) * weights).sum(dim=-1)  # (K, B)
        best = total.argmax(dim=0)  # ties go to the first (smallest listed) scale
        rows = torch.arange(ctx.batch_size, device=best.device)
        chosen_scores = scores[best, rows]
        self._prev = chosen_scores
        self._chosen.append(torch.tensor(self.scales, dtype=torch.float32)[best.cpu()])
        self._scores.append(chosen_scores.cpu())
        self._weights.append(weights.cpu())
        return guided[best.to(guided.device), rows.to(guided.device)]

    def score_candidates(self, ctx: StepContext, guided: torch.Tensor) -> torch.Tensor:
        """Scores (K, B, E) of the K candidates of every sample by every evaluator."""
        k, b = guided.shape[:2]
        evaluators = self._evaluators(ctx.x.device)
        condition = self._condition(ctx, k)
        inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if any(getattr(e, "space", "latent") == "latent" for e in evaluators):
            x_next, t_next = self.candidate_latents(ctx, guided)
            inputs["latent"] = (x_next.flatten(0, 1), torch.full((k * b,), t_next, device=ctx.x.device))
        if any(getattr(e, "space", "latent") == "x0" for e in evaluators):
            x0 = torch.stack([ctx.to_x0(g) for g in guided])  # float32: evaluators judge the exact x0
            inputs["x0"] = (x0.flatten(0, 1), torch.full((k * b,), float(ctx.timestep), device=ctx.x.device))
        columns = []
        for e in evaluators:
            x, t = inputs[getattr(e, "space", "latent")]
            s = torch.as_tensor(e(x, t, condition)).float().reshape(-1)
            if s.shape[0] != k * b or not bool(torch.isfinite(s).all()):
                raise ValueError(f"DynamicCFG: evaluator {getattr(e, 'name', e)!r} returned {tuple(s.shape)} "
                                 f"scores (finite: {bool(torch.isfinite(s).all())}); allowed: {k * b} finite scores")
            columns.append(s.view(k, b).to(ctx.x.device))
        return torch.stack(columns, dim=-1)

    def candidate_latents(self, ctx: StepContext, guided: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Next latents (K, B, ...) in the denoiser's input scale, and the next timestep.

        Every candidate steps its own deep copy of the scheduler from the state before the real
        step, with the generator states restored in between, so all candidates (and then the
        pipeline's own step) see the same noise."""
        if self._scheduler is None:
            raise RuntimeError("DynamicCFG: no scheduler bound; use apply_guidance (it calls on_call) or "
                               "strategy.bind(scheduler, generator, eta) before a custom sampling loop")
        t = torch.as_tensor(ctx.timestep, dtype=self._scheduler.timesteps.dtype)
        ones = torch.ones_like(ctx.x[:1])
        factor_now = None
        out = []
        rng = _RNGSnapshot(self._step_kwargs.get("generator"), ctx.x.device)
        for g in guided:
            scheduler = copy.deepcopy(self._scheduler)
            if factor_now is None:  # scale_model_input's factor: latents = model input / factor
                factor_now = _input_scale(copy.deepcopy(scheduler), ones, t)
            latents = ctx.x / factor_now
            out.append(scheduler.step(g, t, latents, **self._step_kwargs).prev_sample)
            rng.restore()
        t_next = self._next_timestep(ctx)
        factor_next = _input_scale(scheduler, ones, torch.as_tensor(t_next, dtype=t.dtype))
        return torch.stack(out) * factor_next, t_next

    def _next_timestep(self, ctx: StepContext) -> float:
        """The timestep of the next evaluation (0 after the last step), from the scheduler's table."""
        s = self._scheduler
        timesteps = s.timesteps.float().cpu()
        index = getattr(s, "step_index", None)
        if index is None:
            index = int((timesteps - float(ctx.timestep)).abs().argmin())
        return float(timesteps[index + 1]) if index + 1 < len(timesteps) else 0.0

    def evaluator_weights(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, E) weights of the evaluators for this step (see the class docstring)."""
        k, b, n = scores.shape
        base = torch.tensor(self.weights or [1.0] * n, dtype=scores.dtype, device=scores.device).expand(b, n)
        if self.weighting == "fixed" or self._prev is None:
            return base
        current = scores.mean(dim=0)
        if self.weighting == "signed":  # the paper's Eq. 7, sign kept; |e_{t+1}| floored at eps
            sign = torch.where(self._prev < 0, -1.0, 1.0)
            return (current - self._prev) / (sign * self._prev.abs().clamp_min(self.eps)) * base
        alpha = (current - self._prev).abs() / self._prev.abs().clamp_min(self.eps) * base
        total = alpha.sum(dim=-1, keepdim=True)
        return torch.where(total > 1e-12, alpha / total.clamp_min(1e-12), base / base.sum(dim=-1, keepdim=True))

    def _normalized(self, scores: torch.Tensor) -> torch.Tensor:
        if self.normalize == "none" or scores.shape[0] == 1:
            return scores
        return (scores - scores.mean(dim=0)) / scores.std(dim=0, unbiased=False).clamp_min(1e-6)

    def _evaluators(self, device: torch.device) -> list[Callable]:
        if self._loaded is None:
            if self._names is None:
                raise RuntimeError("DynamicCFG: evaluators=None are chosen per pipeline call (on_call); in a custom "
                                   "loop pass evaluators=[...]")
            self._loaded = [resolve_evaluator(e, device) if isinstance(e, str) else e for e in self._names]
        for e in self._loaded:
            if hasattr(e, "to") and not isinstance(e, torch.nn.Module):
                e.to(device)
            if getattr(e, "space", "latent") == "x0" and hasattr(e, "decode") and e.decode is None:
                e.decode = self._decode  # CLIP on a latent pipeline: the call's VAE decode
        return self._loaded

    def _condition(self, ctx: StepContext, k: int) -> Any:
        if ctx.labels is not None:
            return ctx.labels.repeat(k)
        if self._prompts is not None and len(self._prompts) == ctx.batch_size:
            return self._prompts * k
        return None

    # --- configuration -----------------------------------------------------------------------------------
    def to_config(self) -> dict:
        objects = [i for i, e in enumerate(self.evaluators or []) if not isinstance(e, str)]
        if objects:
            raise ValueError(f"DynamicCFG: evaluators{objects} are objects and cannot be serialised; allowed in a "
                             f"config: names of registered evaluators ({', '.join(sorted(NAMED_EVALUATORS))})")
        return super().to_config()


def _input_scale(scheduler: Any, ones: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The factor between the scheduler's latents and the denoiser's input (1/sqrt(sigma^2 + 1) for
    Euler-type schedulers, 1 for DDIM/DDPM and for flow matching, which has no scale_model_input)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return ones if scale is None else scale(ones, t)


class _RNGSnapshot:
    """The RNG states a scheduler step may draw from (the call's generators, the global CPU and CUDA
    ones), saved now; `restore()` rewinds them."""

    def __init__(self, generator: Any, device: torch.device):
        gens = generator if isinstance(generator, (list, tuple)) else [generator]
        self.gens = [(g, g.get_state()) for g in gens if isinstance(g, torch.Generator)]
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        for g, state in self.gens:
            g.set_state(state)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def plot_schedules(history: torch.Tensor, labels: torch.Tensor | Sequence[int] | None = None,
                   class_names: Sequence[str] | None = None, per_class: int = 3, scales: Sequence[float] | None = None):
    """Chosen scale against step for a few samples of each class (one panel per class); a Figure.

    history: (B, steps) from `DynamicCFG.history`. labels: class id per sample (one panel for all
    samples when None). per_class: samples drawn per panel. scales: y ticks (the candidate set)."""
    from matplotlib.figure import Figure

    history = torch.as_tensor(history).float().cpu()
    labels = torch.zeros(history.shape[0], dtype=torch.long) if labels is None else torch.as_tensor(labels).cpu()
    classes = sorted(set(labels.tolist()))
    cols = min(5, len(classes))
    rows = (len(classes) + cols - 1) // cols
    fig = Figure(figsize=(3.2 * cols, 2.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    steps = torch.arange(history.shape[1])
    for ax, c in zip(axes.flat, classes):
        for i in torch.nonzero(labels == c).flatten()[:per_class].tolist():
            ax.step(steps, history[i], where="mid", alpha=0.8, label=f"#{i}")
        name = class_names[c] if class_names is not None and c < len(class_names) else f"class {c}"
        ax.set_title(name if len(classes) > 1 or class_names else "chosen scale", fontsize=9)
        if scales is not None:
            ax.set_yticks(list(scales))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(classes):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    for ax in axes[:, 0]:
        ax.set_ylabel("CFG scale")
    return fig
