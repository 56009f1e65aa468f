"""Perp-Neg (Armandpour, Sadeghian, Zheng, Sadeghian, Zhou 2023, arXiv 2304.04968): a negative prompt that only
removes what it does not share with the positive one.

Plain negative prompting replaces the unconditional prediction with the negative prompt's, which also pushes
away from whatever the two prompts have in common. Perp-Neg keeps the empty-prompt unconditional u and adds the
negative prompt n as a third branch; only the part of (n - u) perpendicular to (c - u) is subtracted:

    pos = c - u,   neg = n - u,   perp = neg - (<neg, pos> / ||pos||^2) pos,   g = u + w (pos - s_neg perp).

As ComfyUI's PerpNeg node and guider compute it (comfy_extras/nodes_perpneg.py, `perp_neg`), except that the
projection is per sample here; ComfyUI sums <neg, pos> and ||pos||^2 over the whole batch, the same at batch 1.
The negative prompt's rows are the reference branch (REF) with one reference prompt: the pipeline's own
`encode_prompt` encodes it once per call (Stable Diffusion and SDXL, `pipelines/reference.py`); call the pipeline
with an empty negative prompt (its default) so that u is the unconditional model. Cost: three evaluations per
sample and step.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .base import COND, REF, UNCOND, Scale, StepContext, TwoBranchRule, check_range, check_scale


def perpendicular_part(neg: torch.Tensor, pos: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """neg minus its projection on pos, per sample (in float32 at least, cast back)."""
    n, p = neg.flatten(1), pos.flatten(1)
    dtype = n.dtype if n.dtype in (torch.float32, torch.float64) else torch.float32
    n, p = n.to(dtype), p.to(dtype)
    coef = (n * p).sum(1, keepdim=True) / ((p * p).sum(1, keepdim=True) + eps)
    return (n - coef * p).reshape(neg.shape).to(neg.dtype)


class PerpNeg(TwoBranchRule):
    """g = u + w ((c - u) - neg_scale perp(n - u, c - u)), n: the `negative_prompt`'s prediction.

    scale: w (None: the call's guidance_scale). negative_prompt: the prompt to steer from. neg_scale: s_neg
    (ComfyUI's default 1.0; 0 is CFG and makes no negative-prompt evaluation)."""

    config_fields = ("scale", "negative_prompt", "neg_scale")

    def __init__(self, scale: Scale = None, negative_prompt: str = "", neg_scale: float = 1.0):
        if not isinstance(negative_prompt, str) or not negative_prompt.strip():
            raise ValueError(f"PerpNeg: negative_prompt={negative_prompt!r} is invalid; allowed: a non-empty prompt")
        self.scale = check_scale("PerpNeg", "scale", scale)
        self.negative_prompt = negative_prompt
        self.neg_scale = check_range("PerpNeg", "neg_scale", neg_scale, 0.0)

    def on_call(self, call) -> None:
        """Refuse a pipeline without prompts: on a class-conditional one the reference branch would swap in a
        class id, not the negative prompt."""
        if call.conditioning != "text":
            raise ValueError(f"PerpNeg: {call.pipeline} is {call.conditioning}-conditioned; Perp-Neg's negative prompt "
                             "needs a text-to-image pipeline (Stable Diffusion, SDXL)")

    def reference_prompts(self) -> list[str]:
        return [self.negative_prompt]

    def reference_labels(self, ctx: StepContext) -> torch.Tensor:
        return torch.zeros(ctx.batch_size, dtype=torch.long, device=ctx.x.device)

    def branches(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        masks = super().branches(ctx)
        if self.neg_scale > 0 and not self.is_off(self.current_scale(ctx)):
            masks[REF] = ctx.all()
        return masks

    def guide(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cond = preds[COND]
        w = self.current_scale(ctx)
        if self.is_off(w):
            return cond
        uncond = preds[UNCOND]
        pos = cond - uncond
        if self.neg_scale == 0:
            return uncond + w * pos
        return uncond + w * (pos - self.neg_scale * perpendicular_part(preds[REF] - uncond, pos))
