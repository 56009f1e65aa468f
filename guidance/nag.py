"""Normalized attention guidance (NAG: Chen, Bandyopadhyay, Zou, Song 2025, arXiv 2505.21179).

Negative prompting for models where CFG cannot run (guidance-distilled Flux dev / schnell, SD3 at
guidance_scale <= 1) or should not carry it alone: the guidance acts inside the denoiser, on the image tokens'
attention outputs of the joint (text + image) attention layers, in the one conditional pass. With Z+ the output
of an attention layer under the prompt and Z- the same layer's output with the negative prompt's text tokens as
keys / values (the image tokens stay the queries), per image token

    Z~ = s Z+ - (s - 1) Z-                       (= Z+ + (s - 1)(Z+ - Z-): s = 1 is off, as CFG's w = 1)
    r  = ||Z~|| / ||Z+||                         (L1 over the feature dimension; the authors' Flux code: L2)
    Z^ = Z~ min(r, tau) / r                      (at most tau times the positive norm)
    Z  = alpha Z^ + (1 - alpha) Z+,

which replaces Z+ before the layer's output projection. The negative prompt's text tokens run through the
transformer beside the prompt's (their own stream, inside the same denoiser call: extra rows of that call, not
another call), as in the authors' pipelines (github.com/ChenDarYen/Normalized-Attention-Guidance,
`nag/attention_joint_nag.py` `NAGJointAttnProcessor2_0`, `nag/attention_flux_nag.py` `NAGFluxAttnProcessor2_0`,
`nag/transformer_flux.py`); `pipelines/branches/nag.py` places it. The rule here is the attention math
(`nag_attention`) and which steps and samples it runs on; the prediction it returns is the conditional one,
made with NAG active, or another rule (`inner`, e.g. CFG) fed with it where the pipeline also runs CFG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

import torch

from .base import COND, GuidanceStrategy, Perturbation, StepContext, check_range

NORMS = ("l1", "l2")


def nag_attention(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float, tau: float, alpha: float,
                  norm: str = "l1") -> torch.Tensor:
    """The NAG attention output from the positive and negative outputs (..., tokens, features), per token.

    norm "l1": the paper's L1 norm with the authors' joint-attention processor's guards (r = |Z~| / (|Z+| + 1e-7),
    Z~ min(r, tau) / (r + 1e-7)); "l2": their Flux processor (L2 norms, no guard). Computed in float32 at least and
    returned in z_pos's dtype."""
    dtype = torch.promote_types(z_pos.dtype, torch.float32)
    pos, neg = z_pos.to(dtype), z_neg.to(dtype)
    extrapolated = torch.lerp(neg, pos, scale) if scale != 1 else pos.clone()  # s pos - (s - 1) neg
    order = 1 if norm == "l1" else 2
    size_pos = torch.linalg.vector_norm(pos, ord=order, dim=-1, keepdim=True)
    size_ext = torch.linalg.vector_norm(extrapolated, ord=order, dim=-1, keepdim=True)
    guard = 1e-7 if norm == "l1" else 0.0
    ratio = size_ext / (size_pos + guard)
    normalized = extrapolated * (ratio.clamp(max=tau) / (ratio + guard))
    return torch.lerp(pos, normalized, alpha).to(z_pos.dtype)


@dataclass(frozen=True)
class NAGPerturbation(Perturbation):
    """NAG's change to the conditional pass (not a branch of its own): the layers it acts on. layers: regular
    expressions searched in the names of the denoiser's joint-attention modules; ("",) matches every one (the
    authors' choice)."""

    KINDS: ClassVar[tuple[str, ...]] = ("nag",)

    def __post_init__(self) -> None:
        if self.kind != "nag":
            raise ValueError(f"NAGPerturbation: kind={self.kind!r}; allowed: 'nag'")
        object.__setattr__(self, "layers", tuple(self.layers))


class NAG(GuidanceStrategy):
    """Normalized attention guidance: the conditional pass with NAG in its joint-attention layers.

    nag_scale: s (1: off; the authors' demos use 5). nag_tau: tau, the largest norm ratio kept (the authors' 2.5).
    nag_alpha: alpha, the blend with the positive output (the authors' Flux default 0.25; their SD3 pipeline's
    0.125). nag_end: NAG runs at the steps whose noise level sigma (flow matching: t / 1000) is >= 1 - nag_end,
    as the authors' `nag_end` (1: every step; 0: only a step at sigma = 1, as theirs). negative_prompt: the prompt to steer from ("" as theirs when none
    is given), encoded by the pipeline's own text encoders once per call. layers: None (every joint-attention
    layer, as the authors) or name patterns of the attention modules ("transformer_blocks.0",
    "single_transformer_blocks"). norm: "l1" (the paper, their SD3 code) or "l2" (their Flux code).
    inner: a rule on (the NAG conditional prediction, the unconditional one) where the pipeline also runs CFG
    (e.g. CFG()); None: the NAG conditional prediction itself, no unconditional pass.

    Cost: one denoiser pass per sample and step (`handle.nfe`); inside it the negative prompt's text tokens (and,
    on Flux's single-stream blocks, their image tokens) are extra rows of the same call. Flux and SD3 pipelines.
    """

    config_fields = ("nag_scale", "nag_tau", "nag_alpha", "nag_end", "negative_prompt", "layers", "norm", "inner")

    def __init__(self, nag_scale: float = 5.0, nag_tau: float = 2.5, nag_alpha: float = 0.25, nag_end: float = 1.0,
                 negative_prompt: str = "", layers: Sequence[str] | None = None, norm: str = "l1",
                 inner: GuidanceStrategy | None = None):
        self.nag_scale = check_range("NAG", "nag_scale", nag_scale, 1.0)
        self.nag_tau = check_range("NAG", "nag_tau", nag_tau, 1.0)
        self.nag_alpha = check_range("NAG", "nag_alpha", nag_alpha, 0.0, 1.0)
        self.nag_end = check_range("NAG", "nag_end", nag_end, 0.0, 1.0)
        if not isinstance(negative_prompt, str):
            raise ValueError(f"NAG: negative_prompt={negative_prompt!r} is invalid; allowed: a string (\"\" included)")
        self.negative_prompt = negative_prompt
        if layers is not None:
            if isinstance(layers, (str, bytes)) or not len(layers) or not all(isinstance(x, str) and x for x in layers):
                raise ValueError(f"NAG: layers={layers!r} is invalid; allowed: None (every joint-attention layer) or "
                                 "a non-empty list of module-name patterns, e.g. ['transformer_blocks.0']")
            layers = list(layers)
        self.layers = layers
        if norm not in NORMS:
            raise ValueError(f"NAG: norm={norm!r} is invalid; allowed: {', '.join(map(repr, NORMS))}")
        self.norm = norm
        if inner is not None and not isinstance(inner, GuidanceStrategy):
            raise ValueError(f"NAG: inner={inner!r} is invalid; allowed: None or a GuidanceStrategy (e.g. CFG())")
        self.inner = inner

    @property
    def perturbation(self) -> NAGPerturbation:  # type: ignore[override]
        return NAGPerturbation("nag", tuple(self.layers) if self.layers is not None else ("",))

    @property
    def requires_uncond(self) -> bool:
        """Only a rule inside needs the pipeline's unconditional pass; NAG alone guides without it."""
        return self.inner is not None and getattr(self.inner, "requires_uncond", True)

    @property
    def is_off(self) -> bool:
        return math.isclose(self.nag_scale, 1.0) or self.nag_alpha == 0.0

    def active(self, ctx: StepContext) -> torch.Tensor:
        """Which samples' conditional pass runs with NAG at this step, (B,) bool."""
        if self.is_off:
            return ctx.none()
        if self.nag_end >= 1.0:
            return ctx.all()
        return (ctx.sigma.float() >= 1.0 - self.nag_end).to(ctx.x.device)

    def reset(self) -> None:
        if self.inner is not None:
            self.inner.reset()

    def branches(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.inner is None:
            return {COND: ctx.all()}
        return {**self.inner.branches(ctx), COND: ctx.all()}

    def guide(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.inner is None:
            return preds[COND]
        return self.inner.combine(ctx, preds).to(preds[COND].dtype)
