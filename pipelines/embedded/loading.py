"""`load_embedded()`: the shipped CIFAR-10 pipeline and its two classifiers, offline, on any device;
`load_embedded_guide()`: the autoguidance guide, a smaller and shorter-trained UNet of the same family."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import UNet2DModel

from ..parametrization import is_scheduler_class
from .classifiers import load_classifier
from .pipeline import ClassConditionalPipeline

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class EmbeddedModel:
    """The embedded default: `pipe` samples, `guidance_classifier` guides, `eval_classifier` judges."""

    pipe: ClassConditionalPipeline
    guidance_classifier: torch.nn.Module
    eval_classifier: torch.nn.Module

    @property
    def class_names(self) -> list[str]:
        return list(self.pipe.config.class_names)


def _require(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what} not found at {folder}; train and export it with the scripts in "
            "pipelines/embedded/training/ (see pipelines/embedded/weights/MODEL_CARD.md)"
        )
    return folder


def _check_device(device) -> torch.device:
    """A device torch can use here (default: cuda when available), or a ValueError naming it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"load_embedded: device={device!r} is a {type(device).__name__}; allowed: 'cpu', 'cuda', "
                        "'cuda:N', 'mps' or a torch.device")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"load_embedded: device={device!r} is not a device name; allowed: cpu, cuda, cuda:N, "
                         "mps") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"load_embedded: device={device!r}, but torch sees {torch.cuda.device_count()} CUDA "
                         "device(s) here; use device='cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"load_embedded: device={device!r}, but MPS is not available here; use device='cpu'")
    return dev


def _scheduler_class(scheduler) -> type:
    """A diffusers scheduler class, given as the class or its name."""
    cls = getattr(diffusers, scheduler, None) if isinstance(scheduler, str) else scheduler
    if not is_scheduler_class(cls):
        raise ValueError(f"load_embedded: scheduler={scheduler!r} is not a diffusers scheduler class (or its name), "
                         "e.g. 'DPMSolverMultistepScheduler'")
    return cls


def load_embedded(device: str | torch.device | None = None, scheduler: str | None = None,
                  weights_dir: str | Path = WEIGHTS_DIR) -> EmbeddedModel:
    """Load the embedded model with no network access.

    device: "cpu", "cuda", ... (default: cuda when available). scheduler: a diffusers scheduler
    class, or its name, to use instead of the shipped DDIM (e.g. "DPMSolverMultistepScheduler").
    """
    device = _check_device(device)
    if not isinstance(weights_dir, (str, os.PathLike)) or str(weights_dir) == "":
        raise TypeError(f"load_embedded: weights_dir={weights_dir!r}; allowed: a folder path (default: the shipped "
                        "weights)")
    weights_dir = Path(weights_dir)
    if scheduler is not None:
        scheduler = _scheduler_class(scheduler)
    pipe = ClassConditionalPipeline.from_pretrained(
        _require(weights_dir / "pipeline", "the embedded diffusion pipeline"), local_files_only=True
    )
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    guidance_clf = load_classifier(_require(weights_dir / "guidance_classifier", "the guidance classifier"), device)
    eval_clf = load_classifier(_require(weights_dir / "eval_classifier", "the evaluation classifier"), device)
    return EmbeddedModel(pipe, guidance_clf, eval_clf)


def load_embedded_guide(device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        weights_dir: str | Path = WEIGHTS_DIR) -> UNet2DModel:
    """The embedded model's autoguidance guide (Karras et al. 2024: a "bad version" of the main model),
    offline, from safetensors only: a UNet2DModel with the main model's input, output, class embedding
    (null class included) and noise schedule, a quarter of its parameters and under a third of its
    training steps (weights/guide/README.md). It samples with the main pipeline's scheduler.

    device: default cuda when available. dtype: e.g. torch.float16 (default: the stored float32).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folder = _require(Path(weights_dir) / "guide", "the embedded guide model")
    unet = UNet2DModel.from_pretrained(folder, local_files_only=True, use_safetensors=True, torch_dtype=dtype)
    return unet.to(device).eval()
