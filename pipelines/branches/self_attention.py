"""SAG's PERTURBED branch ("self_attention_blur"): the denoiser at a degraded input built from the step's own pass.

Self-attention guidance (Hong et al. 2023, arXiv 2210.00939) perturbs the input, not the denoiser: where the
mid-block self-attention of the step's pass attends most, the predicted x0 is blurred, then noised back to the
current level with the pass's own eps, and the denoiser is run on that at the same condition. So this branch is
evaluated after the pipeline's rows of the step, from their predictions, as diffusers' `StableDiffusionSAGPipeline`
does:

- the source of each sample's degraded input is its unconditional row when the step evaluates one (diffusers with
  CFG on: `noise_pred_uncond`, the unconditional attention map and `uncond_emb`), else its conditional row (CFG
  off); the degraded call runs at that row's own inputs (text embeddings, added conditions, and, unlike diffusers'
  class, which drops them there, the call's `cross_attention_kwargs`);
- the map is the mid block's first self-attention (`mid_block.attentions[0].transformer_blocks[0].attn1`), read
  during the pipeline's own call by a forward hook placed for the pipeline call only, which recomputes its
  attention probabilities with the module's own `get_attention_scores` (what diffusers' `CrossAttnStoreProcessor`
  stores) and leaves the module's output untouched; the mask is where the head-mean map's column sums exceed 1;
- x0 and eps come from `pipelines.parametrization` (the scheduler's own noise level, x = alpha x0 + sigma eps for
  the model input), the blur is a 9-tap Gaussian of std `sigma` with reflect padding (diffusers' `sag_masking`),
  and the re-noised input is alpha x0' + sigma eps (its `scheduler.add_noise` at the step's timestep).

Counted in `handle.perturbed_nfe`. Refused by name: denoisers without that mid-block self-attention (transformers,
Kandinsky's simple cross-attention UNets), video UNets, inputs with appended conditioning channels, sequential
layouts (the unconditional row comes in a later call) and the other layouts' special cases.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from guidance.base import COND, PERTURBED, UNCOND, Perturbation, StepContext

from ..layouts.base import DenoiserCall
from ..layouts.rows import first, nan_rows, select_rows
from .base import ConditionalRowsBranch

if TYPE_CHECKING:
    from ..hook import GuidanceHandle

KERNEL_SIZE = 9  # diffusers' sag_masking (and ComfyUI's SAG node) blur with a 9-tap kernel whatever the sigma
# UNet inputs computed by another model from the undegraded latents (ControlNet, T2I-Adapter): no reference says
# whether the degraded call should reuse them or recompute them at the degraded input, so SAG refuses them.
RESIDUAL_KWS = ("down_block_additional_residuals", "mid_block_additional_residual",
                "down_intrablock_additional_residuals")


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int = KERNEL_SIZE) -> torch.Tensor:
    """Each channel of (B, C, H, W) blurred by a normalised 2-D Gaussian of std `sigma`, edges reflected (the
    kernel taps at -(k-1)/2 .. (k-1)/2 as diffusers' `gaussian_blur_2d`)."""
    half = (kernel_size - 1) / 2
    taps = torch.exp(-0.5 * (torch.linspace(-half, half, kernel_size) / sigma) ** 2)
    taps = (taps / taps.sum()).to(device=x.device, dtype=x.dtype)
    kernel = torch.mm(taps[:, None], taps[None, :]).expand(x.shape[-3], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    return F.conv2d(F.pad(x, [pad] * 4, mode="reflect"), kernel, groups=x.shape[-3])


class _MapCapture:
    """Forward hooks on the mid block for one pipeline call: the last call's per-row mask of the tokens whose
    head-mean attention column sums exceed 1 ((rows, tokens) bool), and the map's (h, w) size."""

    def __init__(self, unet: torch.nn.Module, module: str):
        self.attention = unet.get_submodule(module)
        # the Transformer2DModel holding it: its output's (h, w) is the map's size (diffusers reads it there too)
        self.block = unet.get_submodule(module.rsplit(".transformer_blocks", 1)[0])
        self.mask: torch.Tensor | None = None
        self.size: tuple[int, int] | None = None
        self.paused = False
        self._hooks: list = []

    def install(self) -> None:
        self.mask = self.size = None
        self._hooks = [self.attention.register_forward_hook(self._read_map, with_kwargs=True),
                       self.block.register_forward_hook(self._read_size)]

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _read_map(self, attn, args, kwargs, output) -> None:
        if self.paused:
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        rows, tokens = hidden.shape[0], hidden.shape[1]
        mask = attn.prepare_attention_mask(kwargs.get("attention_mask"), tokens, rows)
        query, key = attn.head_to_batch_dim(attn.to_q(hidden)), attn.head_to_batch_dim(attn.to_k(hidden))
        probs = attn.get_attention_scores(query, key, mask)  # (rows * heads, tokens, tokens), batch-major
        self.mask = probs.reshape(rows, attn.heads, tokens, tokens).mean(1).sum(1) > 1.0

    def _read_size(self, module, args, output) -> None:
        if not self.paused:
            self.size = tuple(first(output).shape[-2:])


class SelfAttentionBlurBranch(ConditionalRowsBranch):
    name = PERTURBED

    def __init__(self, handle: "GuidanceHandle", perturbation: Perturbation):
        super().__init__(handle)
        self.perturbation = perturbation
        self.sigma = float(perturbation.sigma if perturbation.sigma is not None else 1.0)
        self.module = perturbation.layers[0]
        self._check(handle, self.module)
        self.capture = _MapCapture(handle.denoiser, self.module)

    @staticmethod
    def _check(h: "GuidanceHandle", module: str) -> None:
        """Refuse up front what the degraded input cannot be built for."""
        a, unet, name = h.adapter, h.denoiser, h.pipe_name
        attn = None
        try:
            attn = unet.get_submodule(module)
        except AttributeError:
            pass
        if attn is None or getattr(attn, "is_cross_attention", True) or not hasattr(attn, "get_attention_scores"):
            raise ValueError(f"{name}: SAG reads the self-attention map of its UNet's mid block ({module}, as "
                             f"diffusers' StableDiffusionSAGPipeline), which its {type(unet).__name__} does not have; "
                             "allowed: pipelines whose denoiser is a UNet2DConditionModel with a cross-attention mid "
                             "block (Stable Diffusion, SDXL, ...)")
        reason = None
        if not isinstance(unet, UNet2DConditionModel):
            reason = (f"its denoiser is a {type(unet).__name__} (frames or extra inputs folded into the rows), while "
                      "SAG's map is read per image of a UNet2DConditionModel")
        elif h.layout.sequential:
            reason = (f"its layout ({h.layout.name}) makes the unconditional row in a later call than the conditional "
                      "one, and SAG's degraded input is built from the unconditional row when CFG is on")
        elif len(h.denoisers) > 1:
            reason = f"it has {len(h.denoisers)} denoisers (experts)"
        elif (a.extra_input_channels or a.guided_channels is not None or a.guide_channels_of_input
              or a.negated_output or a.x0_velocity_floor is not None or a.timestep_ratio is not None
              or a.batch_dims):
            reason = ("its denoiser's input or output is not the plain sample (appended conditioning channels, "
                      "learned variance, a negated, partial or x0 output)")
        if reason is not None:
            raise NotImplementedError(f"{name}: SAG is refused here: {reason}")

    def start_call(self) -> None:
        self.capture.install()

    def end_call(self) -> None:
        self.capture.remove()

    def evaluate_step(self, call: DenoiserCall, masks: dict, cond_rows: torch.Tensor, preds: dict,
                      ctx: StepContext | None = None, uncond_rows: torch.Tensor | None = None) -> torch.Tensor:
        like = preds[COND]
        out = nan_rows(like, like.shape[0])
        asked = masks[PERTURBED].cpu()
        if not bool(asked.any()):
            return out
        h = self.handle
        if ctx is None or uncond_rows is None:  # a layout that does not hand them over (refused up front)
            raise NotImplementedError(f"{h.pipe_name}: SAG needs the step's context and unconditional rows, which "
                                      f"its layout ({h.layout.name}) does not give the perturbed branch")
        residuals = [k for k in RESIDUAL_KWS if call.kwargs.get(k) is not None]
        if residuals:
            raise NotImplementedError(f"{h.pipe_name}: SAG is refused with {residuals[0]} in its UNet call "
                                      "(ControlNet / T2I-Adapter residuals computed from the undegraded latents, which "
                                      "diffusers' SAG never combines with a degraded input)")
        if call.x.ndim != 4:
            raise NotImplementedError(f"{h.pipe_name}: SAG blurs (batch, channels, height, width) latents; its "
                                      f"denoiser received a sample of shape {tuple(call.x.shape)}")
        # Each asked sample's source row: the unconditional one where this step evaluates it, else the conditional.
        use_uncond = masks[UNCOND].cpu() & asked
        samples = torch.nonzero(asked).flatten()
        source = torch.where(use_uncond, uncond_rows, cond_rows)[samples]
        pred = torch.where(use_uncond.to(like.device).view(-1, *[1] * (like.ndim - 1)), preds[UNCOND], like)[
            samples.to(like.device)]
        # Their attention maps, from the last capture: the pipeline's call ran the step's rows in row order.
        ran = torch.cat([uncond_rows[masks[UNCOND].cpu()], cond_rows[masks[COND].cpu()]]).sort().values
        cap = self.capture
        if cap.mask is None or cap.size is None or cap.mask.shape[0] < len(ran):
            raise RuntimeError(f"{h.pipe_name}: SAG found no self-attention map of this step's call in {self.module}")
        where = torch.searchsorted(ran, source)
        token_mask = cap.mask[where.to(cap.mask.device)]
        cap.mask = None  # read once: the next step must capture its own
        degraded = self.degrade(ctx, samples, pred, token_mask, cap.size).to(call.x.dtype)
        args, kwargs = self._inputs(call, source, degraded)
        cap.paused = True
        try:
            result = first(call.forward(*args, **kwargs))
        finally:
            cap.paused = False
        out[samples.to(out.device)] = result.to(out.dtype)
        return out

    def degrade(self, ctx: StepContext, samples: torch.Tensor, pred: torch.Tensor, token_mask: torch.Tensor,
                size: tuple[int, int]) -> torch.Tensor:
        """alpha x0' + sigma eps, x0' the x0 of `pred` blurred where `token_mask` (rows, h * w) is set."""
        param = ctx.param.select(samples.to(ctx.x.device))
        x0, eps = param.to_x0(pred), param.to_eps(pred)  # at least float32
        mask = token_mask.reshape(-1, 1, *size).to(x0.dtype)
        mask = F.interpolate(mask, x0.shape[-2:])  # nearest, as diffusers
        blurred = gaussian_blur(x0, self.sigma)
        x0 = blurred * mask + x0 * (1 - mask)
        return param.alpha.to(x0.dtype) * x0 + param.sigma.to(x0.dtype) * eps

    def _inputs(self, call: DenoiserCall, rows: torch.Tensor, sample: torch.Tensor) -> tuple[tuple, dict]:
        """The call's arguments at `rows`, the noisy sample replaced by `sample`."""
        a, n = self.handle.adapter, call.x.shape[0]
        args = select_rows(call.args, rows, n, a.unbatched)
        kwargs = select_rows(call.kwargs, rows, n, a.unbatched)
        if args:
            args = (sample,) + tuple(args[1:])
        else:
            kwargs = {**kwargs, a.sample_kw: sample}
        return args, kwargs
