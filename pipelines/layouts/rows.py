"""Batch plumbing shared by the layouts: pick rows of every batched tensor in a denoiser call."""

from __future__ import annotations

from typing import Any

import torch


def select_rows(obj: Any, rows: torch.Tensor, batch: int, unbatched: tuple[str, ...] = ()) -> Any:
    """Index every batched tensor (leading dim == batch) in nested args by `rows`.

    Covers keyword tensors that carry a batch dimension: ControlNet residuals (lists), SDXL's
    `added_cond_kwargs` and IP-Adapter image embeddings (dicts), attention masks."""
    if isinstance(obj, torch.Tensor):
        return obj[rows.to(obj.device)] if obj.ndim >= 1 and obj.shape[0] == batch else obj
    if isinstance(obj, dict):
        return {k: (v if k in unbatched else select_rows(v, rows, batch, unbatched)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(select_rows(v, rows, batch, unbatched) for v in obj)
    return obj


def block_rows(rows: torch.Tensor, block: int) -> torch.Tensor:
    """Rows of a tensor that repeats each sample `block` times in a row (AnimateDiff's per-frame prompts)."""
    return (rows[:, None] * block + torch.arange(block)).flatten()


def gather_rows(obj: Any, ref_obj: Any, rows: torch.Tensor, ref_rows: torch.Tensor, batch: int,
                unbatched: tuple[str, ...] = (), per_frame: tuple[str, ...] = ()) -> Any:
    """`obj` at `rows` followed by `ref_obj` (same structure) at `ref_rows`, for every batched tensor.

    Keyword tensors named in `per_frame` (or lists of them: AnimateDiff ControlNet's residuals) hold
    `batch * frames` rows, each sample's frames together."""
    if isinstance(obj, dict) and per_frame:
        out = gather_rows(obj, ref_obj, rows, ref_rows, batch, unbatched + per_frame)
        for k in per_frame:
            if k in obj:
                out[k] = _per_frame_rows(obj[k], ref_obj[k], rows, ref_rows, batch)
        return out
    if isinstance(obj, torch.Tensor):
        if obj.ndim >= 1 and obj.shape[0] == batch:
            return torch.cat([obj[rows.to(obj.device)], ref_obj[ref_rows.to(obj.device)]])
        return obj
    if isinstance(obj, dict):
        return {k: (v if k in unbatched else gather_rows(v, ref_obj[k], rows, ref_rows, batch, unbatched))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather_rows(v, r, rows, ref_rows, batch, unbatched) for v, r in zip(obj, ref_obj))
    return obj


def _per_frame_rows(v: Any, ref_v: Any, rows: torch.Tensor, ref_rows: torch.Tensor, batch: int) -> Any:
    if isinstance(v, (list, tuple)):
        return type(v)(_per_frame_rows(t, r, rows, ref_rows, batch) for t, r in zip(v, ref_v))
    if torch.is_tensor(v) and v.shape[0] % batch == 0 and v.shape[0] > batch:
        f = v.shape[0] // batch
        return gather_rows(v, ref_v, block_rows(rows, f), block_rows(ref_rows, f), batch * f)
    return v


def first(output: Any) -> torch.Tensor:
    """The prediction in a denoiser's output: a tuple (return_dict=False) or diffusers BaseOutput (both index
    this way), or the tensor itself (Würstchen's prior returns one bare: indexing it would take sample 0)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def replace_first(output: Any, tensor: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (tensor,) + tuple(output[1:])
    if isinstance(output, torch.Tensor):
        return tensor
    key = next(iter(output.keys()))
    return type(output)(**{**output, key: tensor})


def nan_rows(like: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.full((batch,) + tuple(like.shape[1:]), float("nan"), dtype=like.dtype, device=like.device)
