"""Colour statistics of generated images at native resolution (evaluation.md section 4).

* mean HSV saturation per image: S = (max - min) / max per pixel, 0 where max = 0, in [0, 1];
* Hasler & Suesstrunk (2003) colourfulness on the 0..255 scale: sigma_rgyb + 0.3 mu_rgyb.

Both are reported as mean and population std over images. Compute them on the final uint8 images, before any
evaluation resize (resizing blurs colours and lowers S).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def _check_images(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")


def hsv_saturation(images: Tensor) -> Tensor:
    """Mean HSV saturation of each uint8 image (B, 3, H, W) -> (B,) float64."""
    _check_images(images)
    x = images.float()  # the ratio is scale-free, so no /255
    high, low = x.amax(1), x.amin(1)
    s = torch.where(high > 0, (high - low) / high.clamp_min(1), torch.zeros_like(high))
    return s.double().mean((1, 2))


def colourfulness(images: Tensor) -> Tensor:
    """Hasler-Suesstrunk colourfulness of each uint8 image (B, 3, H, W) -> (B,) float64."""
    _check_images(images)
    r, g, b = images.double().unbind(1)
    rg, yb = r - g, (r + g) / 2 - b
    dims = (1, 2)
    sigma = (rg.var(dims, unbiased=False) + yb.var(dims, unbiased=False)).sqrt()
    mu = (rg.mean(dims).square() + yb.mean(dims).square()).sqrt()
    return sigma + 0.3 * mu


class Saturation(Metric):
    """Streams per-image saturation and colourfulness; ``compute`` gives their means and stds over images.

    Per-image values (two floats each) are kept rather than moment sums: exact std, and cheap.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("saturation", [], dist_reduce_fx="cat")
        self.add_state("colourfulness", [], dist_reduce_fx="cat")

    def update(self, images: Tensor) -> None:
        self.saturation.append(hsv_saturation(images))
        self.colourfulness.append(colourfulness(images))

    def compute(self) -> dict[str, float]:
        sat, col = dim_zero_cat(self.saturation), dim_zero_cat(self.colourfulness)
        return {"saturation_mean": float(sat.mean()), "saturation_std": float(sat.std(unbiased=False)),
                "colourfulness_mean": float(col.mean()), "colourfulness_std": float(col.std(unbiased=False)),
                "num_images": int(sat.numel())}
