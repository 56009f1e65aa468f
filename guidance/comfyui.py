"""ComfyUI's post-CFG rules that have no diffusers counterpart, so that a workflow's settings carry over:
CFGNorm and Mahiro. Each is CFG followed by the node's correction of the guided denoised estimate (ComfyUI hands
its post-CFG hooks the denoised predictions, our x0), written from reading the node's source and checked against
a re-implementation of it (tests/test_comfyui_conventions.py). The other ComfyUI conventions live with the rule
they modify: `APG.from_comfyui` (its APG node counts the scale one lower) and `Rescale(..., rescale_space="v")`
(its RescaleCFG node rescales the v-prediction).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from .base import COND, UNCOND, GuidanceStrategy, Scale, StepContext, check_range, check_scale, resolve_scale


def _cfg_x0(name: str, scale: Scale, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
    w = resolve_scale(name, "scale", scale, ctx)
    return preds[UNCOND] + w * (preds[COND] - preds[UNCOND])


def _channels_first(name: str, x0: torch.Tensor) -> None:
    if x0.ndim < 4:
        raise ValueError(f"{name}: the node takes its norms over the channels of (B, C, H, W) latents; this "
                         f"pipeline's latents have shape {tuple(x0.shape)} (packed tokens), where the channel "
                         "dimension is not the node's; allowed: a pipeline with (B, C, ...) latents")


class CFGNorm(GuidanceStrategy):
    """ComfyUI's CFGNorm node (comfy_extras/nodes_cfg.py, `CFGNorm.execute.cfg_norm`): the CFG denoised estimate
    scaled down, per pixel, to at most the conditional one's channel norm, times `strength`:

        D = D_cfg * clamp(||D_c||_C / (||D_cfg||_C + 1e-8), 0, 1) * strength.

    scale: CFG's w (None: the call's). strength: >= 0 (the node's default 1).
    """

    space = "x0"
    config_fields = ("scale", "strength")

    def __init__(self, scale: Scale = None, strength: float = 1.0):
        self.scale = check_scale("CFGNorm", "scale", scale)
        self.strength = check_range("CFGNorm", "strength", strength, 0.0)

    def guide(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        guided = _cfg_x0("CFGNorm", self.scale, ctx, preds)
        _channels_first("CFGNorm", guided)
        norm_cond = torch.linalg.vector_norm(preds[COND], dim=1, keepdim=True)
        norm_guided = torch.linalg.vector_norm(guided, dim=1, keepdim=True)
        return guided * (norm_cond / (norm_guided + 1e-8)).clamp(0.0, 1.0) * self.strength


def _signed_sqrt(t: torch.Tensor) -> torch.Tensor:
    return t.abs().sqrt() * t.sign()


class Mahiro(GuidanceStrategy):
    """ComfyUI's Mahiro node (comfy_extras/nodes_mahiro.py, `Mahiro.patch.mahiro_normd`): CFG pulled towards the
    "naive leap" w D_c by how little the leap and CFG agree with the unconditional direction:

        leap = w D_c,  merge = (leap + D_cfg) / 2,  sim = mean cos(ssqrt(w D_u), ssqrt(merge)) over channels,
        s = 2 (sim + 1),  D = (s D_cfg + (4 - s) leap) / 4        (ssqrt: signed square root).

    scale: CFG's w (None: the call's). per_sample: the node averages the per-pixel cosines over the whole batch,
    so one sample's result depends on the others in its batch; True (default) averages per sample (a batch equals
    its samples alone), False reproduces the node on the same batch.
    """

    space = "x0"
    config_fields = ("scale", "per_sample")

    def __init__(self, scale: Scale = None, per_sample: bool = True):
        self.scale = check_scale("Mahiro", "scale", scale)
        self.per_sample = bool(per_sample)

    def guide(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        w = resolve_scale("Mahiro", "scale", self.scale, ctx)
        guided = _cfg_x0("Mahiro", w, ctx, preds)
        _channels_first("Mahiro", guided)
        leap = preds[COND] * w
        merge = (leap + guided) / 2
        cosine = F.cosine_similarity(_signed_sqrt(preds[UNCOND] * w), _signed_sqrt(merge))  # over channels
        sim = cosine.flatten(1).mean(1).view(-1, *[1] * (guided.ndim - 1)) if self.per_sample else cosine.mean()
        weight = 2 * (sim + 1)
        return (weight * guided + (4 - weight) * leap) / 4
