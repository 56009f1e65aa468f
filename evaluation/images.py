"""Streaming uint8 image batches (B, 3, H, W) from a folder of PNG/JPG files, an .npz or an in-memory array."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _to_rgb_nhwc(images: np.ndarray) -> np.ndarray:
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    if images.ndim == 3:  # greyscale (N, H, W)
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images (N, H, W, 3) in NHWC layout, got {images.shape}")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _array_batches(images: np.ndarray, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, len(images), batch_size):
        chunk = _to_rgb_nhwc(np.ascontiguousarray(images[start:start + batch_size]))
        yield torch.from_numpy(chunk).permute(0, 3, 1, 2)


def _file_batches(files: list[Path], batch_size: int) -> Iterator[Tensor]:
    batch: list[np.ndarray] = []
    for file in files:
        with Image.open(file) as img:
            arr = np.asarray(img.convert("RGB"))
        if batch and (len(batch) == batch_size or arr.shape != batch[0].shape):  # sizes may differ across files
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
            batch = []
        batch.append(arr)
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """PNG/JPG files under ``folder`` (recursively), in sorted order so runs are reproducible."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_source(source, limit: int | None = None,
                      shuffle_seed: int | None = None) -> tuple[np.ndarray | list[Path], int]:
    """(array or file list, count). An .npz must hold an ``images`` array, uint8 NHWC.

    ``shuffle_seed`` permutes the items before ``limit`` (class-ordered data sets such as CIFAR-10)."""
    if isinstance(source, Tensor):
        source = source.cpu().numpy()
    if isinstance(source, np.ndarray):
        items = source
    elif isinstance(source, list):  # image files, as this function returned them
        items = source
    elif Path(source).suffix == ".npz":
        if not Path(source).is_file():
            raise FileNotFoundError(f"{source}: no such file")
        with np.load(source, allow_pickle=False) as data:
            if "images" not in data:
                raise ValueError(f"{source} has no 'images' array (found {sorted(data.files)})")
            items = data["images"]
    elif Path(source).is_dir():
        items = list_image_files(source)
        if not items:
            raise ValueError(f"no PNG/JPG files under {source}")
    else:
        raise ValueError(f"image source {source!r} is neither a folder, an .npz nor an array")
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(items))
        items = items[order] if isinstance(items, np.ndarray) else [items[i] for i in order]
    items = items[:limit] if limit is not None else items
    if isinstance(items, np.ndarray):  # dtype and layout refused now, not after the first batch has run
        if items.dtype != np.uint8:
            raise ValueError(f"expected uint8 images, got {items.dtype}")
        if not (items.ndim == 3 or (items.ndim == 4 and items.shape[-1] in (1, 3))):
            raise ValueError(f"expected images (N, H, W, 3) in NHWC layout, got {items.shape}")
    return items, len(items)


def batches_from(items: np.ndarray | list[Path], batch_size: int = 50) -> Iterator[Tensor]:
    """uint8 (B, 3, H, W) batches from what ``load_image_source`` returned."""
    if isinstance(items, np.ndarray):
        return _array_batches(items, batch_size)
    return _file_batches(items, batch_size)


def iter_image_batches(source, batch_size: int = 50, limit: int | None = None) -> Iterator[Tensor]:
    """uint8 (B, 3, H, W) batches from a folder, an .npz with ``images`` (uint8 NHWC) or an NHWC array."""
    return batches_from(load_image_source(source, limit)[0], batch_size)
