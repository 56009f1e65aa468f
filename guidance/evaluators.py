"""Evaluators for `DynamicCFG`: score a batch of candidates for their condition, higher is better.

An evaluator is any callable `evaluator(x, timestep, condition) -> (B,) scores` plus a `space`
attribute saying what `x` is:

* `space = "latent"` (default): `x` is the candidate *next* noisy latent in the denoiser's input
  scale (what the model would receive at the next step) and `timestep` (B,) its timestep on the
  model's training grid (0 after the final step). This is the paper's setting: small
  timestep-aware networks trained on noised latents of one model.
* `space = "x0"`: `x` is the denoised estimate x0 of the candidate's guided prediction at the
  current step and `timestep` the current one; for pixel-space evaluators such as CLIP (give them a
  `decode` for latent-diffusion pipelines).

`condition` is the target class ids (B,) on class-conditional pipelines, else the prompt of each
sample (a list of B strings) or None.

Shipped here: `NoiseAwareNet` (the tiny network behind the embedded model's evaluators),
`ClassifierEvaluator` (alignment: log p(class | x_t, t)), `DiscriminatorEvaluator` (quality: the
real-versus-generated logit), `CLIPEvaluator` (open_clip on x0), `CallableEvaluator` (wrap any
function), `CleanLookahead` (a noise-aware evaluator at t = 0 on the x0 estimate), and a registry of named
evaluators (`register_evaluator`); the embedded model's trained ones ("alignment", "quality",
"alignment-x0") are registered by `pipelines` (`pipelines.call.load_embedded_evaluator`), which owns
their weights. No diffusers import here, and no path of pipelines/.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .hub import SafetensorsHubMixin, load_pretrained, read_config

SPACES = ("latent", "x0")


# --- the tiny noise-aware network ---------------------------------------------------------------

def timestep_features(t: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of the timestep (B,) -> (B, dim), as in DDPM's time embedding."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class NoiseAwareNet(nn.Module, SafetensorsHubMixin, library_name="guidance-kit", tags=["dynamic-cfg-evaluator"]):
    """Stride-2 conv blocks (GroupNorm, SiLU) with the timestep embedding added after every conv,
    global average pooling, one linear head. `depth` > 1 adds residual stride-1 convs per stage.
    Small enough that scoring every candidate costs a few percent of a denoiser call (the paper's
    ~1%): ~67k parameters at widths (24, 48, 96), depth 1.

    Saved and loaded with huggingface_hub's model mixin (`guidance.hub`): `net.save_pretrained(folder,
    config={**net.config, "kind": ...})`, `NoiseAwareNet.from_pretrained(folder_or_repo)`."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64), out_dim: int = 10, in_channels: int = 3,
                 temb_dim: int = 32, groups: int = 8, depth: int = 1):
        super().__init__()
        if isinstance(widths, (str, bytes)) or not hasattr(widths, "__iter__"):
            raise ValueError(f"NoiseAwareNet: widths={widths!r}: expected a list of positive integers")
        widths = [_positive_int("widths", w) for w in widths]
        out_dim, in_channels = _positive_int("out_dim", out_dim), _positive_int("in_channels", in_channels)
        groups, depth = _positive_int("groups", groups), _positive_int("depth", depth)
        temb_dim = _positive_int("temb_dim", temb_dim)
        if not widths or temb_dim % 2:
            raise ValueError(f"NoiseAwareNet: widths={widths} must be non-empty and temb_dim={temb_dim} even")
        self.set_config(widths=widths, out_dim=out_dim, in_channels=in_channels, temb_dim=temb_dim, groups=groups,
                        depth=depth)
        self.temb_dim = temb_dim
        self.temb = nn.Sequential(nn.Linear(temb_dim, 64), nn.SiLU())
        convs, norms, biases = [], [], []
        cin = in_channels
        for w in widths:
            for k in range(depth):
                convs.append(nn.Conv2d(cin, w, 3, stride=2 if k == 0 else 1, padding=1))
                norms.append(nn.GroupNorm(min(groups, w), w))
                biases.append(nn.Linear(64, w))
                cin = w
        self.convs, self.norms, self.biases = nn.ModuleList(convs), nn.ModuleList(norms), nn.ModuleList(biases)
        self.head = nn.Linear(cin, out_dim)

    @property
    def config(self) -> dict:
        """The arguments the network was built from (what config.json holds, besides extra keys)."""
        return dict(self._hub_mixin_config)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        emb = self.temb(timestep_features(timestep.to(x.device).expand(x.shape[0]), self.temb_dim))
        h = x
        for conv, norm, bias in zip(self.convs, self.norms, self.biases):
            out = torch.nn.functional.silu(norm(conv(h)) + bias(emb)[:, :, None, None])
            # stride-1 convs (depth > 1) are residual; the first conv of a stage changes the shape
            h = h + out if conv.stride == (1, 1) else out
        return self.head(h.mean(dim=(2, 3)))


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < 1:
        raise ValueError(f"NoiseAwareNet: {name}={value!r}: expected a positive integer")
    return int(value)


def load_net(source: str | os.PathLike, device: str | torch.device = "cpu", **hub_kwargs: Any) -> NoiseAwareNet:
    """A `NoiseAwareNet` saved with `save_pretrained` (a folder or a Hub repo id), frozen, in eval mode."""
    read_config(source, "evaluator", "train and export one with python -m pipelines.embedded.training.train_evaluators",
                **hub_kwargs)
    return load_pretrained(NoiseAwareNet, source, "evaluator", device, **hub_kwargs)


# --- evaluators ------------------------------------------------------------------------------------

class Evaluator:
    """Base class (optional: any callable with a `space` attribute works)."""

    space: str = "latent"
    name: str = "evaluator"

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, condition: Any) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device) -> "Evaluator":
        return self


class CallableEvaluator(Evaluator):
    """Any function `fn(x, timestep, condition) -> (B,)`, in the given space."""

    def __init__(self, fn: Callable, space: str = "latent", name: str | None = None):
        if space not in SPACES:
            raise ValueError(f"CallableEvaluator: space={space!r} is unknown; allowed: {', '.join(SPACES)}")
        self.fn, self.space, self.name = fn, space, name or getattr(fn, "__name__", "callable")

    def __call__(self, x, timestep, condition):
        return self.fn(x, timestep, condition)


class _NetEvaluator(Evaluator):
    def __init__(self, net: NoiseAwareNet, name: str):
        self.net, self.name = net.eval().requires_grad_(False), name

    def to(self, device) -> "_NetEvaluator":
        self.net.to(device)
        return self

    def logits(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        p = next(self.net.parameters())
        with torch.no_grad():
            return self.net(x.to(p.device, p.dtype), timestep.to(p.device)).float()


class ClassifierEvaluator(_NetEvaluator):
    """Alignment: log p(target class | x_t, t) of a noise-aware classifier (needs class ids)."""

    def __init__(self, net: NoiseAwareNet, name: str = "alignment"):
        super().__init__(net, name)

    def __call__(self, x, timestep, condition):
        if not torch.is_tensor(condition):
            raise ValueError(f"{self.name}: needs class ids as the condition (a class-conditional pipeline), "
                             f"got {type(condition).__name__}")
        logp = self.logits(x, timestep).log_softmax(dim=1)
        return logp.gather(1, condition.to(logp.device).long().view(-1, 1)).squeeze(1)


class DiscriminatorEvaluator(_NetEvaluator):
    """Quality: the logit log(p / (1 - p)) of p = p(real | x_t, t); the condition is ignored.

    The paper's note writes e = -log(p / (1 - p)); we take the sign that makes "more real" score
    higher, since every evaluator here is maximised (our reading)."""

    def __init__(self, net: NoiseAwareNet, name: str = "quality"):
        super().__init__(net, name)

    def __call__(self, x, timestep, condition):
        return self.logits(x, timestep)[:, 0]


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN / _STD, its defaults
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_INTERPOLATIONS = ("bicubic", "bilinear")
CLIP_RESIZE_MODES = ("shortest", "squash")


def clip_preprocess_config(model: nn.Module) -> dict[str, Any]:
    """An open_clip model's own eval preprocessing settings (size, mean, std, interpolation, resize_mode):
    `model.visual.preprocess_cfg`, which `open_clip.create_model` sets from the model's config and
    pretrained tag, else the older `image_size` / `image_mean` / `image_std` attributes, else
    open_clip's defaults (read as open_clip's `get_model_preprocess_cfg` does, without importing it)."""
    visual = getattr(model, "visual", model)
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = cfg.get("size", getattr(visual, "image_size", None) or 224)
    return {"size": tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size)),
            "mean": tuple(cfg.get("mean") or getattr(visual, "image_mean", None) or CLIP_MEAN),
            "std": tuple(cfg.get("std") or getattr(visual, "image_std", None) or CLIP_STD),
            "interpolation": cfg.get("interpolation", "bicubic"),
            "resize_mode": cfg.get("resize_mode", "shortest")}


def _resized_size(h: int, w: int, target: tuple[int, int]) -> tuple[int, int]:
    """Output size of open_clip's 'shortest' resize: torchvision's Resize(int) for square targets
    (short side exactly the target, long side truncated), timm's ResizeKeepRatio otherwise (rounded)."""
    th, tw = target
    if th == tw:
        return (th, int(th * w / h)) if h <= w else (int(tw * h / w), tw)
    ratio = min(h / th, w / tw)
    return round(h / ratio), round(w / ratio)


def clip_preprocess(images: torch.Tensor, size: int | Sequence[int] = 224, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD, interpolation: str = "bicubic",
                    resize_mode: str = "shortest") -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) -> CLIP input: open_clip's eval transform written on tensors
    (resize with antialias, centre crop, mean/std), so it runs on the images' device and keeps
    gradients. The one preprocessing of both DynamicCFG's CLIP evaluator and `evaluation`'s CLIP score;
    pass `**clip_preprocess_config(model)` for a model's own settings. Against open_clip's PIL
    transform it differs only by PIL's uint8 rounding between and after its two resampling passes
    (same kernel; measured in tests/test_clip_preprocess.py)."""
    if interpolation not in CLIP_INTERPOLATIONS:
        raise ValueError(f"clip_preprocess: interpolation={interpolation!r}; allowed: {', '.join(CLIP_INTERPOLATIONS)}")
    if resize_mode not in CLIP_RESIZE_MODES:  # 'longest' pads with a fill colour: not needed by any CLIP we use
        raise ValueError(f"clip_preprocess: resize_mode={resize_mode!r}; allowed: {', '.join(CLIP_RESIZE_MODES)}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"clip_preprocess: images of shape {tuple(images.shape)}; allowed: (B, 3, H, W) in [0, 1]")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    resized = (h, w) if resize_mode == "squash" else _resized_size(images.shape[-2], images.shape[-1], (h, w))
    x = torch.nn.functional.interpolate(images.float(), size=resized, mode=interpolation, align_corners=False,
                                        antialias=True).clamp(0, 1)  # PIL's kernel (a = -0.5) and its clipping
    top, left = int(round((resized[0] - h) / 2)), int(round((resized[1] - w) / 2))  # torchvision's CenterCrop
    x = x[..., top:top + h, left:left + w]
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).expand(3).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).expand(3).view(1, 3, 1, 1)
    return (x - m) / s


class CLIPEvaluator(Evaluator):
    """CLIP similarity between the decoded x0 estimate and the text of each sample's condition.

    model: an open_clip CLIP model (`open_clip.create_model(...)`; pretrained weights are the
    user's, nothing is downloaded here). tokenizer: its tokenizer. texts: one text per class id,
    for class-conditional pipelines (e.g. "a photo of a cat"); prompts are used as given otherwise.
    decode: maps x0 to images in [-1, 1] (a VAE decode for latent pipelines; identity for pixel
    models such as the embedded one); None takes the call's own (DynamicCFG sets it per call).
    Images go through `clip_preprocess` with the model's own settings (`clip_preprocess_config`), the
    preprocessing of `evaluation`'s CLIP score. Text features are cached per
    text for the evaluator's life (moved with the model when its device changes).
    """

    space = "x0"

    def __init__(self, model: nn.Module, tokenizer: Callable, texts: Sequence[str] | None = None,
                 decode: Callable | None = None, name: str = "clip"):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.decode, self.name = tokenizer, decode, name
        self.texts = list(texts) if texts is not None else None
        self._text_cache: dict[str, torch.Tensor] = {}
        self.preprocess_config = clip_preprocess_config(model)

    def to(self, device) -> "CLIPEvaluator":
        self.model.to(device)
        device = next(self.model.parameters()).device
        # Features follow the model; DynamicCFG moves evaluators at every step, so never drop them.
        self._text_cache = {t: f.to(device) for t, f in self._text_cache.items()}
        return self

    def _texts_for(self, condition: Any, batch: int) -> list[str]:
        if torch.is_tensor(condition):
            if self.texts is None:
                raise ValueError(f"{self.name}: class ids given but no texts=[one text per class]")
            return [self.texts[int(i)] for i in condition.tolist()]
        if isinstance(condition, str):
            return [condition] * batch
        if condition is None or len(condition) != batch:
            raise ValueError(f"{self.name}: needs one prompt per sample ({batch}), got {condition!r}")
        return list(condition)

    def _text_features(self, texts: list[str], device) -> torch.Tensor:
        missing = sorted(set(texts) - set(self._text_cache))
        if missing:
            with torch.no_grad():
                f = self.model.encode_text(self.tokenizer(missing).to(device)).float()
            for t, row in zip(missing, torch.nn.functional.normalize(f, dim=-1)):
                self._text_cache[t] = row
        return torch.stack([self._text_cache[t].to(device) for t in texts])

    def __call__(self, x, timestep, condition):
        device = next(self.model.parameters()).device
        images = self.decode(x) if self.decode is not None else x
        images = (images.float().to(device).clamp(-1, 1) + 1) / 2
        with torch.no_grad():
            pixels = clip_preprocess(images, **self.preprocess_config)
            f = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        return (f * self._text_features(self._texts_for(condition, x.shape[0]), device)).sum(dim=1)


class CleanLookahead(Evaluator):
    """A noise-aware evaluator applied at t = 0 to the candidate's x0 estimate (space "x0").

    Our variant of the paper's latent scoring (not in the paper): the candidate next latents of one
    step differ by a small multiple of the guidance direction, so a noisy-latent score mostly reads
    the sign of one directional derivative; x0 estimates differ by w (x0_c - x0_u) and show where each
    scale leads. clip_range clamps x0 first (the pixel model's data range; None for latents)."""

    space = "x0"

    def __init__(self, evaluator: Evaluator, clip_range: tuple[float, float] | None = (-1.0, 1.0),
                 name: str | None = None):
        self.evaluator, self.clip_range = evaluator, clip_range
        self.name = name or f"{getattr(evaluator, 'name', 'evaluator')}-x0"

    def to(self, device) -> "CleanLookahead":
        self.evaluator.to(device)
        return self

    def __call__(self, x, timestep, condition):
        if self.clip_range is not None:
            x = x.clamp(*self.clip_range)
        return self.evaluator(x, torch.zeros_like(timestep), condition)


# Evaluators that strategy configs may name (JSON cannot hold a network): name -> loader(device).
# pipelines/ registers the embedded model's ("alignment", "quality", "alignment-x0") with their
# weights; users may register their own (e.g. "clip" around a CLIP model they have).
NAMED_EVALUATORS: dict[str, Callable[[Any], Any]] = {}
# Pipeline class name -> the evaluator names DynamicCFG uses there by default.
DEFAULT_EVALUATORS: dict[str, tuple[str, ...]] = {}


def register_evaluator(name: str, loader: Callable[[Any], Any], default_for: Sequence[str] = ()) -> None:
    """Make `name` usable in `DynamicCFG(evaluators=[name])` and configs; `loader(device)` builds it.
    default_for: pipeline class names on which DynamicCFG(evaluators=None) includes it."""
    NAMED_EVALUATORS[name] = loader
    for pipeline in default_for:
        names = DEFAULT_EVALUATORS.get(pipeline, ())
        DEFAULT_EVALUATORS[pipeline] = names + ((name,) if name not in names else ())


def resolve_evaluator(name: str, device: str | torch.device = "cpu") -> Any:
    if name not in NAMED_EVALUATORS:
        raise ValueError(f"evaluator={name!r} is not a registered evaluator; allowed: "
                         f"{', '.join(sorted(NAMED_EVALUATORS)) or '(none registered: import pipelines)'}, or an "
                         "evaluator object / callable (guidance.evaluators.register_evaluator adds names)")
    return NAMED_EVALUATORS[name](device)
