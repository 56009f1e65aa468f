"""The branches beyond the pipeline's own conditional and unconditional rows, one provider each.

A provider has one job: given a denoiser call and the rows a strategy asked for, return their predictions
(NaN in the rows not asked) and record what it evaluated, counted apart from the pipeline's own rows.

- `guide_model.GuideModelBranch` (GUIDE): a second denoiser, e.g. autoguidance's weaker model;
- `perturbed.PerturbedBranch` (PERTURBED): the pipeline's own denoiser with a perturbation active, e.g. PAG's
  identity self-attention.
- `self_attention.SelfAttentionBlurBranch` (PERTURBED, kind "self_attention_blur"): SAG's, the denoiser at an input
  degraded from the step's own predictions and self-attention map, so evaluated after the pipeline's rows.

Reference-class rows (REF) share the pipeline's own batch and are made by the batched layout
(`pipelines/reference.py` encodes their prompts).
"""

from .base import ConditionalRowsBranch
from .guide_model import GuideModelBranch
from .perturbed import PerturbedBranch, Perturber
from .self_attention import SelfAttentionBlurBranch


def perturbed_branch(handle, perturbation) -> ConditionalRowsBranch:
    """The provider of a perturbation's kind (checked when made)."""
    if perturbation.kind == "self_attention_blur":
        return SelfAttentionBlurBranch(handle, perturbation)
    return PerturbedBranch(handle, perturbation)


__all__ = ["ConditionalRowsBranch", "GuideModelBranch", "PerturbedBranch", "Perturber", "SelfAttentionBlurBranch",
           "perturbed_branch"]
