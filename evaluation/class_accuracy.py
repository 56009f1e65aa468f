"""Accuracy of a given classifier on generated images against the labels they were generated for.

The classifier is any ``nn.Module`` from images to logits; its ``input_range`` attribute (default (-1, 1)) says
how uint8 pixels are scaled before it sees them. Resizing or normalisation beyond that belongs in the module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric


class ClassAccuracy(Metric):
    """Top-1 accuracy with integer per-class counts (correct, total) over the target labels."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, classifier: nn.Module, num_classes: int,
                 input_range: tuple[float, float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.classifier = classifier.eval()
        self.num_classes = num_classes
        self.input_range = tuple(input_range or getattr(classifier, "input_range", (-1.0, 1.0)))
        self.add_state("correct", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        params = list(classifier.parameters())
        if params:  # keep the counts where the classifier runs
            self.to(params[0].device)

    def scale(self, images: Tensor) -> Tensor:
        """uint8 [0, 255] -> float in ``input_range``."""
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {images.dtype}")
        low, high = self.input_range
        return low + (high - low) * images.float() / 255

    def update(self, images: Tensor, labels: Tensor) -> None:
        device = self.correct.device
        labels = torch.as_tensor(labels, device=device).long()
        with torch.no_grad():
            predictions = self.classifier(self.scale(images.to(device))).argmax(1)
        self.total += torch.bincount(labels, minlength=self.num_classes)
        self.correct += torch.bincount(labels[predictions == labels], minlength=self.num_classes)

    def compute(self) -> dict:
        correct, total = self.correct.tolist(), self.total.tolist()
        return {"accuracy": sum(correct) / max(sum(total), 1),
                "per_class_correct": correct, "per_class_total": total,
                "per_class_accuracy": [c / t if t else float("nan") for c, t in zip(correct, total)]}
