"""CLIP score: per sample ``100 * max(cos(E_image, E_text), 0)``, then the mean over samples.

The clamp is per sample (the definition in torchmetrics' docstring and Hessel et al.); torchmetrics' code clamps
the mean instead, which differs only when some cosines are negative. Two backends:

* open_clip: a model name plus a local checkpoint file (or a pretrained tag when online). Images are
  preprocessed by ``guidance.evaluators.clip_preprocess`` with the model's own settings (size, mean / std,
  interpolation, resize mode from open_clip's model config), on tensors and on the model's device: the
  same function DynamicCFG's CLIP evaluator steers by, so the score it reports and the one it steers by
  see the same pixels. open_clip's own PIL transform differs from it only by PIL's uint8 rounding
  (measured in tests/test_clip_preprocess.py). For OpenAI weights
  loaded from a file use the ``-quickgelu`` model name (e.g. ``ViT-L-14-quickgelu``): open_clip checks the
  activation only for tags, and a plain GELU gives silently wrong embeddings.
* transformers: a ``CLIPModel`` and ``CLIPProcessor``, or a local folder holding both.

Written on torchmetrics' ``Metric`` but not on its ``CLIPScore``: that one is transformers-only, clamps the
mean, and (torchmetrics 1.9.0) breaks on transformers 5, whose ``get_*_features`` return model outputs.
No CLIP weights are obtainable offline here; tests use randomly initialised tiny models.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from guidance.evaluators import clip_preprocess, clip_preprocess_config


def _check_images(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _looks_like_path(pretrained) -> bool:
    text = str(pretrained)
    return os.path.sep in text or text.endswith((".bin", ".pt", ".pth", ".safetensors"))


class OpenClipBackend(nn.Module):
    """open_clip model + `clip_preprocess` with its settings + its tokenizer (the BPE vocab ships with open_clip)."""

    def __init__(self, model_name: str, pretrained: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", **create_kwargs):
        super().__init__()
        import open_clip

        if pretrained is not None and _looks_like_path(pretrained) and not os.path.isfile(pretrained):
            raise FileNotFoundError(f"open_clip checkpoint not found: {pretrained}")
        self.model = open_clip.create_model(model_name, pretrained=None if pretrained is None else str(pretrained),
                                            device=device, **create_kwargs).eval()
        self.preprocess_config = clip_preprocess_config(self.model)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_name, self.pretrained = model_name, pretrained

    def describe(self) -> dict:
        return {"backend": "open_clip", "model": self.model_name, "pretrained": str(self.pretrained),
                "preprocessing": f"guidance.evaluators.clip_preprocess {self.preprocess_config}"}

    def embed(self, images: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
        device = _device_of(self.model)
        pixels = clip_preprocess(images.to(device).float() / 255, **self.preprocess_config)
        return self.model.encode_image(pixels), self.model.encode_text(self.tokenizer(texts).to(device))


def _embeddings(output) -> Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return output if isinstance(output, Tensor) else output.pooler_output


class TransformersClipBackend(nn.Module):
    """transformers ``CLIPModel`` + ``CLIPProcessor`` (images given as uint8 tensors, as torchmetrics does)."""

    def __init__(self, model: nn.Module, processor, name: str | None = None):
        super().__init__()
        self.model, self.processor = model.eval(), processor
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu"):
        """Load model and processor from a local folder only (never the hub)."""
        from transformers import CLIPModel, CLIPProcessor

        if not os.path.isdir(folder):
            raise FileNotFoundError(f"CLIP folder not found: {folder}")
        model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device)
        return cls(model, CLIPProcessor.from_pretrained(folder, local_files_only=True), name=str(folder))

    def describe(self) -> dict:
        return {"backend": "transformers", "model": self.name, "pretrained": self.name,
                "preprocessing": repr(self.processor.image_processor).replace("\n", " ")}

    def embed(self, images: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
        device = _device_of(self.model)
        max_length = self.model.config.text_config.max_position_embeddings
        inputs = self.processor(text=texts, images=[img.cpu() for img in images], return_tensors="pt",
                                padding=True, truncation=True, max_length=max_length)
        image = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(device))
        text = self.model.get_text_features(input_ids=inputs["input_ids"].to(device),
                                            attention_mask=inputs["attention_mask"].to(device))
        return _embeddings(image), _embeddings(text)


def clip_scores(backend: nn.Module, images: Tensor, texts: list[str]) -> Tensor:
    """Per-sample ``100 * max(cos, 0)`` for uint8 images (B, 3, H, W) and B captions, float64."""
    _check_images(images)
    if len(texts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(texts)} captions")
    with torch.no_grad():
        image, text = backend.embed(images, list(texts))
    cos = torch.nn.functional.cosine_similarity(image.double(), text.double(), dim=-1)
    return 100 * cos.clamp_min(0)


class ClipScore(Metric):
    """Streams per-sample CLIP scores; ``compute`` gives their mean."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, backend: nn.Module, **kwargs):
        super().__init__(**kwargs)
        self.backend = backend
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_samples", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.to(_device_of(backend))

    def update(self, images: Tensor, texts: list[str]) -> None:
        scores = clip_scores(self.backend, images, texts).to(self.score_sum.device)
        self.score_sum += scores.sum()
        self.num_samples += scores.numel()

    def compute(self) -> Tensor:
        return self.score_sum / self.num_samples

    def describe(self) -> dict:
        return {**self.backend.describe(), "score": "mean over samples of 100 * max(cos, 0)"}
