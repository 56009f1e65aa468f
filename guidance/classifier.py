"""The classifier interface of the classifier-based strategies (EluCD, GFCG).

Both methods judge the denoised estimate x0 with an off-the-shelf image classifier. A
`ImageClassifier` wraps any `nn.Module` from images to logits with what the strategy must know to
feed it: the input range and size it was trained on, an optional mean/std normalisation, and the
class names. For latent pipelines the strategy decodes x0 with the call's decode function first
(`CallDescription.decode`: the pipeline's VAE, built by pipelines/), which costs one decoder
forward per step (and, for EluCD, its backward too).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F


def smooth_relu(module: nn.Module, beta: float) -> nn.Module:
    """A deep copy of `module` with every `nn.ReLU` module replaced by `nn.Softplus(beta)`.

    EluCD's "smooth classifier": ReLU nets have piecewise-constant input gradients; Softplus gives
    the guidance a smooth gradient field. Functional `F.relu` calls cannot be swapped (the shipped
    classifiers use modules only). The original module is untouched.
    """
    if not beta > 0:
        raise ValueError(f"smooth_relu: beta={beta!r} is invalid; allowed: a number > 0")
    smooth = copy.deepcopy(module)
    for parent in smooth.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Softplus(beta=beta))
    return smooth


def frozen(module: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients: guidance differentiates w.r.t. the image only."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class ImageClassifier:
    """An image classifier as the guidance strategies see it.

    module: images (B, 3, H, W) -> logits (B, K). input_range: the pixel range it was trained on,
    e.g. (-1, 1) for the embedded classifiers, (0, 1) for torchvision models (then pass
    `mean`/`std`, e.g. the ImageNet ones). size: resize (bilinear, antialiased) to this side
    length first, or None to feed the native resolution (the EluCD code feeds 128 px images to a
    224 px ResNet on purpose: keep None to reproduce it). class_names: for display and prompts.
    """

    def __init__(self, module: nn.Module, input_range: tuple[float, float] = (-1.0, 1.0), size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 class_names: Sequence[str] | None = None):
        if not isinstance(module, nn.Module):
            raise TypeError(f"ImageClassifier: module={type(module).__name__} is not a torch.nn.Module")
        lo, hi = input_range
        if not hi > lo:
            raise ValueError(f"ImageClassifier: input_range={input_range!r} is invalid; "
                             "allowed: (low, high), low < high")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"ImageClassifier: size={size!r} is invalid; allowed: None or an integer >= 1")
        if (mean is None) != (std is None):
            raise ValueError("ImageClassifier: pass both mean and std, or neither")
        self.module = frozen(module)
        self.input_range = (float(lo), float(hi))
        self.size = size
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.class_names = list(class_names) if class_names is not None else None

    @classmethod
    def wrap(cls, classifier: Any) -> "ImageClassifier":
        """An ImageClassifier as is; a module with `input_range`/`image_size` attributes (the
        embedded classifiers) with those; any other module as taking [-1, 1] at native size."""
        if isinstance(classifier, ImageClassifier):
            return classifier
        return cls(classifier, tuple(getattr(classifier, "input_range", (-1.0, 1.0))),
                   getattr(classifier, "image_size", None))

    def smooth(self, beta: float | None) -> "ImageClassifier":
        """The same classifier with ReLU -> Softplus(beta) (None: unchanged)."""
        if beta is None:
            return self
        out = copy.copy(self)
        out.module = frozen(smooth_relu(self.module, beta))
        return out

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the classifier's input (range, size, normalisation), differentiable."""
        lo, hi = self.input_range
        x = (images.to(torch.promote_types(images.dtype, torch.float32)) + 1) / 2 * (hi - lo) + lo
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        if self.mean is not None:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        param = next(self.module.parameters(), None)
        return x if param is None else x.to(param.dtype)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (at least float32) of images in [-1, 1]."""
        logits = self.module(self.prepare(images))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


def expand_targets(owner: str, target: Sequence[int] | torch.Tensor, batch: int) -> torch.Tensor:
    """User-given class ids (one per prompt, or per sample) as a (batch,) tensor."""
    ids = torch.as_tensor(target, dtype=torch.long).flatten()
    if ids.numel() == 0 or batch % ids.numel():
        raise ValueError(
            f"{owner}: target has {ids.numel()} class ids for a batch of {batch}; allowed: one id per prompt "
            "(repeated for num_images_per_prompt) or one per sample"
        )
    return ids.repeat_interleave(batch // ids.numel())


def class_prompts(targets: Sequence[int], class_names: Sequence[str], template: str = "a photo of a {}") -> list[str]:
    """Prompts for text-to-image pipelines from a label set: pass them as `prompt` and the same
    `targets` as the strategy's `target`, so the classifier knows which class each prompt asks for."""
    if "{}" not in template:
        raise ValueError(f"class_prompts: template={template!r} has no '{{}}' for the class name")
    out = []
    for t in targets:
        if not 0 <= int(t) < len(class_names):
            raise ValueError(f"class_prompts: target {t!r} is out of range; allowed: [0, {len(class_names) - 1}]")
        out.append(template.format(class_names[int(t)]))
    return out


# Classifiers that strategy configs may name (JSON cannot hold a module): name -> loader. The
# embedded model registers "embedded-guidance" and "embedded-eval" (in its pipelines package).
NAMED_CLASSIFIERS: dict[str, Callable[[], Any]] = {}


def register_classifier(name: str, loader: Callable[[], Any]) -> None:
    NAMED_CLASSIFIERS[name] = loader


def resolve_classifier(owner: str, classifier: Any) -> ImageClassifier:
    """A classifier object, or the name of a registered one (loaded on first use)."""
    if isinstance(classifier, str):
        if classifier not in NAMED_CLASSIFIERS:
            raise ValueError(
                f"{owner}: classifier={classifier!r} is not a registered classifier name; allowed: "
                f"{', '.join(sorted(NAMED_CLASSIFIERS)) or '(none registered)'}, or an nn.Module / ImageClassifier"
            )
        classifier = NAMED_CLASSIFIERS[classifier]()
    if not isinstance(classifier, (ImageClassifier, nn.Module)):
        raise TypeError(f"{owner}: classifier={type(classifier).__name__} is neither an nn.Module "
                        "nor an ImageClassifier")
    return ImageClassifier.wrap(classifier)


class ClassifierInput:
    """What every classifier-based strategy shares: the classifier (by object or registered name),
    the target class per sample, the x0 -> image decode of latent pipelines, and the base guidance
    `inner` it adds to (None: the conditional prediction alone). Mix in before GuidanceStrategy."""

    inner: Any = None

    @property
    def requires_uncond(self) -> bool:
        return self.inner is not None and getattr(self.inner, "requires_uncond", True)

    def on_call(self, call: Any) -> None:
        super().on_call(call)  # forwards to `inner`
        self._decode = call.decode  # the call's VAE decode for latent pipelines, None in pixel space

    def base_branches(self, ctx) -> dict[str, torch.Tensor]:
        return dict(self.inner.branches(ctx)) if self.inner is not None else {"cond": ctx.all()}

    def base_prediction(self, ctx, preds) -> torch.Tensor:
        return preds["cond"] if self.inner is None else self.inner.combine(ctx, preds)

    def _setup_classifier(self, owner: str, classifier: Any, target: Any) -> None:
        self._owner = owner
        if isinstance(classifier, str) and classifier not in NAMED_CLASSIFIERS:
            # as for DynamicCFG's evaluators: an unknown name is refused when the strategy is built, not
            # at the first sampling step (the shipped names are registered by `import pipelines`)
            raise ValueError(f"{owner}: classifier={classifier!r} is not a registered classifier name; allowed: "
                             f"{', '.join(sorted(NAMED_CLASSIFIERS)) or '(none registered: import pipelines)'}, or an "
                             "nn.Module / ImageClassifier (guidance.register_classifier adds names)")
        self.classifier = classifier  # a registered name (serialisable) or the object itself
        self._classifier_obj = None if isinstance(classifier, str) else resolve_classifier(owner, classifier)
        self._classifier_name = classifier if isinstance(classifier, str) else None
        self.target = None if target is None else [int(t) for t in torch.as_tensor(target).flatten().tolist()]
        self._decode: Callable | None = None

    @property
    def image_classifier(self) -> ImageClassifier:
        if self._classifier_obj is None:
            self._classifier_obj = resolve_classifier(self._owner, self._classifier_name)
        return self._classifier_obj

    def images_of(self, x0: torch.Tensor) -> torch.Tensor:
        """x0 estimate -> images in [-1, 1] (VAE decode for latent pipelines)."""
        return x0 if self._decode is None else self._decode(x0)

    def targets_of(self, ctx) -> torch.Tensor:
        """Target class per sample: the user's `target`, else the pipeline's class labels."""
        if self.target is not None:
            return expand_targets(self._owner, self.target, ctx.batch_size).to(ctx.x.device)
        if ctx.labels is None:
            raise ValueError(
                f"{self._owner}: target=None but this pipeline passes no class labels to its denoiser; "
                "for text-to-image pipelines pass target=[class id per prompt] (see guidance.class_prompts)"
            )
        return ctx.labels.to(ctx.x.device).long()

    def to_config(self) -> dict:
        if self._classifier_name is None:
            raise ValueError(
                f"{self._owner}: a classifier given as an object cannot be serialised; pass a registered "
                f"classifier name ({', '.join(sorted(NAMED_CLASSIFIERS)) or 'none registered'}) to use configs"
            )
        return super().to_config()
