"""Gradient-free classifier guidance (GFCG; Shenoy et al., WACV 2026, arXiv 2411.15393): OUR READING.

What the paper's abstract says (methods.md §3.1, verified): a pre-trained classifier, in inference
mode only, picks at each step a time-adaptive reference class and a guidance scale "depending on
how confused the diffusion model is"; a conditional sample of the reference class is the point to
move away from, as the unconditional one is in CFG; it complements CFG. The method section could
not be read, so every rule below is an explicit option, and the defaults are our reading:

- reference="most_probable_other" (default): the classifier's most probable class other than the
  target, on the conditional x0 estimate: the class the sample is most at risk of becoming.
  "most_probable": its most probable class, with no reference (scale 0) when that is the target.
- adaptive="confusion" (default): omega_t = scale * p_ref / (p_target + p_ref), in [0, scale):
  zero when the classifier is sure of the target, scale / 2 when it cannot tell the two apart.
  "constant": omega_t = scale whenever there is a reference.
- The guided prediction is base + omega_t * (D_target - D_ref), base = `inner` (default CFG at the
  call's scale; None = the conditional prediction alone). With omega_t = 0 it is the base exactly.
  `inner=Autoguidance()` is GFCG + ATG, the paper's headline setting [A]: the base is autoguidance
  (the guide model's branch is asked through `inner`), D_ref the main model at the reference class
  (our reading; the abstract's "without additional computational overhead" may mean that the
  reference replaces a pass, which we cannot check: here it is one extra main-model row).
- Timing: the reference is chosen from the previous scheduler step's conditional estimate (once
  per step: a multi-evaluation solver's corrector keeps its step's reference), so the reference
  prediction is evaluated in the same denoiser batch as the other branches (one call per step, no
  extra sequential pass). At the first step there is no reference yet. Samples with omega_t = 0 skip
  the reference evaluation (their NFE is the base's).

- Text-to-image pipelines (the paper also evaluates GFCG there): the reference branch is the
  conditional input with the prompt of the reference class, `prompt_template.format(class name)`.
  The caller encodes the K class prompts once per call with the pipeline's own text encoders
  (pipelines/reference.py, SD and SDXL) and swaps each reference row's text inputs; `target` gives
  the class id each prompt asks for.

Cost: one classifier forward per step (no gradients; plus a VAE decode for latent pipelines) and
one extra denoiser row per sample that has a reference.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .base import COND, REF, GuidanceStrategy, StepContext, check_range
from .cfg import CFG
from .classifier import ClassifierInput
from .elucd import DEFAULT_INNER

REFERENCE_RULES = ("most_probable_other", "most_probable")
ADAPTIVE_RULES = ("confusion", "constant")


def reference_class(probs: torch.Tensor, target: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference class id, whether there is a reference) per sample."""
    if rule == "most_probable_other":
        others = probs.scatter(1, target.view(-1, 1), -1.0)
        return others.argmax(dim=1), torch.ones_like(target, dtype=torch.bool)
    top = probs.argmax(dim=1)
    return top, top != target


def adaptive_scale(probs: torch.Tensor, target: torch.Tensor, ref: torch.Tensor, has_ref: torch.Tensor,
                   scale: float, rule: str) -> torch.Tensor:
    """omega_t per sample (see the module docstring)."""
    if rule == "constant":
        omega = torch.full(target.shape, scale, dtype=torch.float32, device=probs.device)
    else:
        p_target = probs.gather(1, target.view(-1, 1)).squeeze(1)
        p_ref = probs.gather(1, ref.view(-1, 1)).squeeze(1)
        omega = scale * p_ref / (p_target + p_ref).clamp_min(1e-30)
    return torch.where(has_ref, omega, torch.zeros_like(omega))


class GFCG(ClassifierInput, GuidanceStrategy):
    """Gradient-free classifier guidance, our reading (module docstring): a classifier in inference
    mode picks a reference class per sample and step; the prediction moves away from it.

    classifier: an nn.Module, guidance.ImageClassifier, or registered name ("embedded-guidance").
    scale: the largest reference scale. inner: base guidance (default CFG; None: conditional only;
    Autoguidance(): GFCG + ATG, with the guide model given to apply_guidance).
    target: class id per prompt for text-to-image pipelines (class-conditional ones use their labels).
    class_names, prompt_template: on text-to-image pipelines the reference branch is the conditional
    input with the prompt `prompt_template.format(class_names[ref])` (e.g. "a photo of a {}");
    class_names=None takes the classifier's own class names (ImageClassifier(class_names=...)).
    Both are ignored by class-conditional pipelines, which swap the class id.

    After a call, `reference_history` (steps, B) holds the reference class per step (-1: none) and
    `scale_history` (steps, B) omega_t.
    """

    config_fields = ("classifier", "scale", "reference", "adaptive", "inner", "target", "class_names",
                     "prompt_template")

    def __init__(self, classifier: Any, scale: float = 2.0, reference: str = "most_probable_other",
                 adaptive: str = "confusion", inner: GuidanceStrategy | None = DEFAULT_INNER,
                 target: Sequence[int] | None = None, class_names: Sequence[str] | None = None,
                 prompt_template: str | None = None):
        name = type(self).__name__
        self.scale = check_range(name, "scale", scale, 0)
        if reference not in REFERENCE_RULES:
            raise ValueError(f"{name}: reference={reference!r} is unknown; allowed: {', '.join(REFERENCE_RULES)}")
        if adaptive not in ADAPTIVE_RULES:
            raise ValueError(f"{name}: adaptive={adaptive!r} is unknown; allowed: {', '.join(ADAPTIVE_RULES)}")
        inner = CFG() if inner is DEFAULT_INNER else inner
        if inner is not None and not isinstance(inner, GuidanceStrategy):
            raise TypeError(f"{name}: inner={inner!r} is not a GuidanceStrategy (or None for the conditional model)")
        self.reference, self.adaptive, self.inner = reference, adaptive, inner
        if class_names is not None and (isinstance(class_names, str) or not class_names
                                        or not all(isinstance(c, str) and c for c in class_names)):
            raise ValueError(f"{name}: class_names={class_names!r} is invalid; allowed: None (the classifier's "
                             "names) or a non-empty list of non-empty strings, one per classifier class")
        if prompt_template is not None and (not isinstance(prompt_template, str) or "{}" not in prompt_template):
            raise ValueError(f"{name}: prompt_template={prompt_template!r} has no '{{}}' for the class name; "
                             "allowed: None (class-conditional pipelines) or e.g. 'a photo of a {}'")
        self.class_names = None if class_names is None else list(class_names)
        self.prompt_template = prompt_template
        self._setup_classifier(name, classifier, target)
        self.reset()

    def reset(self) -> None:
        if getattr(self, "inner", None) is not None:
            self.inner.reset()
        self._probs: torch.Tensor | None = None  # classifier's belief on the last conditional x0
        self._ref: torch.Tensor | None = None
        self._omega: torch.Tensor | None = None
        self.reference_history: list[torch.Tensor] = []
        self.scale_history: list[torch.Tensor] = []

    def branches(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        masks = self.base_branches(ctx)
        if not ctx.starts_step and self._omega is not None and self._omega.shape[0] == ctx.batch_size:
            if self._ref is not None:  # a corrector evaluation keeps its step's reference (one decision per step)
                masks[REF] = self._omega > 0
            return masks
        if self._probs is None or self.scale == 0:
            self._ref, self._omega = None, torch.zeros(ctx.batch_size, device=ctx.x.device)
        else:
            target = self.targets_of(ctx)
            ref, has_ref = reference_class(self._probs, target, self.reference)
            self._omega = adaptive_scale(self._probs, target, ref, has_ref, self.scale, self.adaptive)
            self._ref = ref
            masks[REF] = self._omega > 0
        return masks

    def reference_labels(self, ctx: StepContext) -> torch.Tensor:
        return self._ref

    def to_config(self) -> dict:
        config = super().to_config()
        for f in ("class_names", "prompt_template"):  # unset: left out, so configs (and run folders) made
            if config["params"][f] is None:           # before these options existed stay equal
                del config["params"][f]
        return config

    def reference_prompts(self) -> list[str] | None:
        """The prompt of each class id, for the reference branch on text-to-image pipelines; None
        without a prompt_template. Class names: `class_names`, else the classifier's."""
        if self.prompt_template is None:
            return None
        names = self.class_names or self.image_classifier.class_names
        if not names:
            raise ValueError(f"{type(self).__name__}: prompt_template={self.prompt_template!r} needs class names: "
                             "pass class_names=[...] (one per classifier class, in its label order) or a classifier "
                             "with class names (guidance.ImageClassifier(module, class_names=[...]))")
        return [self.prompt_template.format(n) for n in names]

    @torch.no_grad()
    def class_probabilities(self, x0: torch.Tensor) -> torch.Tensor:
        clf = self.image_classifier
        clf.module.to(x0.device)
        return clf.logits(self.images_of(x0)).softmax(dim=1)

    def combine(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        base = self.base_prediction(ctx, preds)
        guided = base
        has_ref = ctx.evaluated.get(REF)
        if has_ref is not None and bool(has_ref.any()):
            rows = has_ref.to(base.device)
            omega = self._omega.to(base.device).view(-1, *[1] * (base.ndim - 1))
            push = omega * (preds[COND].float() - preds[REF].float())  # CFG-like difference: space-invariant
            guided = base.clone()
            guided[rows] = (base.float() + push)[rows].to(base.dtype)
        if ctx.starts_step:
            self._record(ctx)
            self._probs = self.class_probabilities(ctx.to_x0(preds[COND]))  # for the next step's reference
        return guided

    def _record(self, ctx: StepContext) -> None:
        ref = torch.full((ctx.batch_size,), -1, dtype=torch.long)
        if self._ref is not None:
            ref = torch.where(self._omega.cpu() > 0, self._ref.cpu(), ref)
        self.reference_history.append(ref)
        self.scale_history.append(self._omega.float().cpu())
