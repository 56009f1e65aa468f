"""One image grid per rule page (docs/rules/img/<page>.png), from the embedded CIFAR-10 model.

    python benchmarks/rule_grids.py            # about a minute on one CPU thread

Each grid has two rows over the ten classes, the same seeds in both: CFG at the rule's scale on top, the rule
below (DDIM 20 steps). It shows what the rule does to this small model's samples; the measured effects, with their
N and intervals, are on the effects page.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages

from guidance import (APG, CFG, FDG, MAMBOG, PAG, TCFG, AdaptiveGuidance, APGMix, Autoguidance,  # noqa: E402
                      CFGZeroStar, DynamicThresholding, MimicScaleThresholding)
from guidance.comfyui import CFGNorm  # noqa: E402
from pipelines import apply_guidance  # noqa: E402
from pipelines.embedded import load_embedded  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "rules" / "img"
# page -> (rule, the call's scale)
GRIDS = {
    "cfg": (CFG(guidance_rescale=0.7), 7.5),
    "apg": (APG(), 10.0),
    "adaptive": (AdaptiveGuidance(threshold=0.995, similarity_space="x0"), 3.0),
    "autoguidance": (Autoguidance(guide_model="embedded"), 2.0),
    "cfg-zero-star": (CFGZeroStar(), 3.0),
    "tcfg": (TCFG(), 3.0),
    "mambo-g": (MAMBOG(), 10.0),
    "apg-mix": (APGMix(), 10.0),
    "fdg": (FDG((10.0, 5.0)), 3.0),
    "dynamic-thresholding": (DynamicThresholding(CFG()), 10.0),
    "comfyui": (CFGNorm(), 5.0),
    "perturbed": (PAG(pag_scale=3.0, layers=["mid"]), 3.0),
    "mimic-scale": (MimicScaleThresholding(mimic_scale=3.0), 10.0),
}


def sample(pipe, scale: float) -> torch.Tensor:
    return pipe(class_labels=list(range(10)), guidance_scale=scale, num_inference_steps=20, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def main() -> None:
    torch.set_num_threads(1)
    pipe = load_embedded(device="cpu").pipe
    OUT.mkdir(parents=True, exist_ok=True)
    for page, (rule, scale) in GRIDS.items():
        cfg = sample(pipe, scale)
        with apply_guidance(pipe, rule):
            guided = sample(pipe, scale)
        save_image(make_grid(torch.cat([cfg, guided]), nrow=10, padding=1), OUT / f"{page}.png")
        print(f"{page}: {OUT / f'{page}.png'}")


if __name__ == "__main__":
    main()
