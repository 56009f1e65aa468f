"""One way to write a file so that a kill, a full disk or Ctrl-C never leaves a half-written one behind.

Here, in the bottom layer, because both the evaluation package (metric checkpoints, reports, reference
statistics) and the embedded model's training scripts (training checkpoints) use it, and the diffusers
integration must not import the evaluation package (which imports it). Plain files only: no diffusers,
no strategy."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Callable

TMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on ``<path>.tmp`` and rename it over ``path``; on any failure the .tmp is removed.

    The rename is atomic on POSIX and Windows, so readers see the old file or the new one, never a torn one.
    (A kill -9 between the two steps can leave a .tmp; `remove_stale_tmp` clears those at the next start.)
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through `atomic_write`."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Delete the .tmp files a killed process left under ``folder``; returns them."""
    stale = sorted(Path(folder).rglob(f"*{TMP_SUFFIX}")) if Path(folder).is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
