"""The branches beyond the pipeline's own conditional and unconditional rows, one provider each.

A provider has one job: given a denoiser call and the rows a strategy asked for, return their predictions
(NaN in the rows not asked) and record what it evaluated, counted apart from the pipeline's own rows.

- `guide_model.GuideModelBranch` (GUIDE): a second denoiser, e.g. autoguidance's weaker model;
- `perturbed.PerturbedBranch` (PERTURBED): the pipeline's own denoiser with a perturbation active, e.g. PAG's
  identity self-attention.
- `self_attention.SelfAttentionBlurBranch` (PERTURBED, kind "self_attention_blur"): SAG's, the denoiser at an input
  degraded from the step's own predictions and self-attention map, so evaluated after the pipeline's rows.
- `nag.NAGConditional` (kind "nag"): not a branch but a change of the conditional pass itself.

`extra_branches(handle, guide_model)` makes those a handle's strategy asks for, once, when guidance is applied.

Reference-class rows (REF) share the pipeline's own batch and are made by the batched layout
(`pipelines/reference.py` encodes their prompts).
"""

from guidance.base import GUIDE, PERTURBED

from ..strategy_claim import strategy_tree
from .base import ConditionalRowsBranch
from .guide_model import GuideModelBranch
from .nag import NAGConditional
from .perturbed import PerturbedBranch, Perturber
from .self_attention import SelfAttentionBlurBranch


def perturbed_branch(handle, perturbation) -> ConditionalRowsBranch:
    """The provider of a perturbation's kind (checked when made)."""
    if perturbation.kind == "self_attention_blur":
        return SelfAttentionBlurBranch(handle, perturbation)
    return PerturbedBranch(handle, perturbation)


def extra_branches(handle, guide_model) -> tuple[dict[str, ConditionalRowsBranch], NAGConditional | None]:
    """The providers of the branches beyond the pipeline's own, checked up front, for the handle's strategy and
    `guide_model`; and NAG's change of the conditional pass (not a branch: no rows of its own), or None."""
    branches: dict[str, ConditionalRowsBranch] = {}
    guide = GuideModelBranch.resolve(handle, guide_model)
    if guide is not None:
        branches[GUIDE] = guide
    tree = strategy_tree(handle.strategy)
    perturbations = {s.perturbation for s in tree if s.perturbation is not None}
    if len(perturbations) > 1:
        raise ValueError(f"{type(handle.strategy).__name__} asks for several perturbations "
                         f"{sorted(map(str, perturbations))}; allowed: one perturbed branch per pipeline")
    conditional = None
    if perturbations and next(iter(perturbations)).kind == "nag":
        node = next(s for s in tree if getattr(s.perturbation, "kind", None) == "nag")
        conditional = NAGConditional(handle, node, node is handle.strategy)
    elif perturbations:
        branches[PERTURBED] = perturbed_branch(handle, perturbations.pop())
    return branches, conditional


__all__ = ["ConditionalRowsBranch", "GuideModelBranch", "NAGConditional", "PerturbedBranch", "Perturber",
           "SelfAttentionBlurBranch", "extra_branches", "perturbed_branch"]
