"""Shared pieces of the embedded-model training scripts: data, checkpoints, configs.

The scripts are resumable: every `checkpoint_every` steps they write model, EMA and optimiser state
plus the step counter to `<out>/checkpoint.pt` (atomically), and the data order is a pure function
of (seed, epoch), so an interrupted run continues on exactly the batches it would have seen.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from guidance.atomic import atomic_save

DEFAULT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "cifar10"


def training_parser(doc: str, default_config: str, default_out: str) -> argparse.ArgumentParser:
    """The options every training script shares (config, data, output, device, budget, export)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path(__file__).parent / "configs" / default_config)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=Path(default_out))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and checkpoint) after this wall time")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--export", type=Path, default=None, help="export the trained model to this folder and exit")
    return p


def load_config(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


def load_cifar10(data_dir: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 split as uint8 NCHW images and int64 labels (kept uint8 to save memory)."""
    path = Path(data_dir) / f"{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"data_dir={str(data_dir)!r}: no {split}.npz there; pass the folder holding CIFAR-10's "
            "train.npz/test.npz (see ../shared/data/cifar10/README.md)"
        )
    with np.load(path, allow_pickle=False) as d:
        images = torch.from_numpy(d["images"]).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(d["labels"]).long()
    return images, labels


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range of the diffusion model and both classifiers."""
    return images_uint8.float().div(127.5).sub(1.0)


@dataclass
class BatchSampler:
    """Epoch-wise shuffled batches whose order depends only on (seed, step): resumable exactly."""

    num_items: int
    batch_size: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.batch_size

    def indices(self, step: int) -> torch.Tensor:
        epoch, within = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        return torch.from_numpy(perm[within * self.batch_size : (within + 1) * self.batch_size])


def augment(x: torch.Tensor, generator: torch.Generator, crop_pad: int = 0) -> torch.Tensor:
    """Random horizontal flip, plus an optional random crop after reflect padding (classifiers)."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if crop_pad:
        n, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (crop_pad,) * 4, mode="reflect")
        dy = torch.randint(0, 2 * crop_pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * crop_pad + 1, (n,), generator=generator)
        x = _crop(padded, dy, dx, h, w)
    return x


def _crop(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return torch.stack([p[:, y : y + h, z : z + w] for p, y, z in zip(padded, dy.tolist(), dx.tolist())])


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic write (`guidance.atomic`): a kill during the save never leaves a truncated checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state, path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)
