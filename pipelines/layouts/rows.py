"""Batch plumbing shared by the layouts: pick rows of every batched tensor in a denoiser call."""

from __future__ import annotations

from typing import Any

import torch


class PerSampleList(list):
    """A list with one item per row of the denoiser batch (Z-Image passes its latents as [C, 1, H, W] tensors and
    its caption features, of different lengths, this way): rows select its items and never look inside them.

    The hook marks such lists (`mark_per_sample_lists`) when the denoiser's sample itself comes as a list; every
    other list or tuple keeps its behaviour (ControlNet residuals: one tensor per block, rows selected in each),
    even where its length happens to equal the batch. It is a list, so the denoiser reads it as the one it got."""


def mark_per_sample_lists(args: tuple, kwargs: dict, batch: int) -> tuple[tuple, dict]:
    """The call's top-level lists of `batch` items as PerSampleList (nested lists, dicts and tuples untouched)."""
    def mark(v: Any) -> Any:
        return PerSampleList(v) if type(v) is list and len(v) == batch else v

    return tuple(mark(v) for v in args), {k: mark(v) for k, v in kwargs.items()}


def _items(obj: PerSampleList, rows: torch.Tensor) -> list:
    return [obj[i] for i in rows.tolist()]


def rows_on_dim(key: str, dim: int, batch: int, *parts: tuple[Any, torch.Tensor]) -> Any:
    """A keyword whose batch is not on dimension 0 (`Adapter.batch_dims`: HiDream's Llama-3 embeddings are
    (layers, batch, tokens, dim)): each (tensor, rows) of `parts` indexed on `dim`, concatenated there. Its
    rows are never guessed: a tensor without `batch` entries on `dim` is an error, not passed through."""
    value = parts[0][0]
    if value is None:
        return value
    if not (torch.is_tensor(value) and value.ndim > dim and value.shape[dim] == batch):
        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise ValueError(f"the denoiser's keyword {key}={shape} is declared batched on dimension {dim} "
                         f"(Adapter.batch_dims), but it does not hold the call's {batch} rows there; allowed: a tensor "
                         f"with {batch} entries on dimension {dim}")
    picked = [t.index_select(dim, r.to(t.device)) for t, r in parts]
    return picked[0] if len(picked) == 1 else torch.cat(picked, dim)


def select_rows(obj: Any, rows: torch.Tensor, batch: int, unbatched: tuple[str, ...] = (),
                batch_dims: dict[str, int] | None = None) -> Any:
    """Index every batched tensor (leading dim == batch) in nested args by `rows`.

    Covers keyword tensors that carry a batch dimension: ControlNet residuals (lists), SDXL's
    `added_cond_kwargs` and IP-Adapter image embeddings (dicts), attention masks; a PerSampleList of `batch`
    items is indexed itself (its items are whole samples). Keywords in `batch_dims` are indexed on their
    own dimension (`rows_on_dim`)."""
    dims = batch_dims or {}
    if isinstance(obj, PerSampleList):
        return PerSampleList(_items(obj, rows)) if len(obj) == batch else obj
    if isinstance(obj, torch.Tensor):
        return obj[rows.to(obj.device)] if obj.ndim >= 1 and obj.shape[0] == batch else obj
    if isinstance(obj, dict):
        return {k: (v if k in unbatched else rows_on_dim(k, dims[k], batch, (v, rows)) if k in dims
                    else select_rows(v, rows, batch, unbatched, batch_dims)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(select_rows(v, rows, batch, unbatched, batch_dims) for v in obj)
    return obj


def block_rows(rows: torch.Tensor, block: int) -> torch.Tensor:
    """Rows of a tensor that repeats each sample `block` times in a row (AnimateDiff's per-frame prompts)."""
    return (rows[:, None] * block + torch.arange(block)).flatten()


def gather_rows(obj: Any, ref_obj: Any, rows: torch.Tensor, ref_rows: torch.Tensor, batch: int,
                unbatched: tuple[str, ...] = (), per_frame: tuple[str, ...] = (),
                batch_dims: dict[str, int] | None = None) -> Any:
    """`obj` at `rows` followed by `ref_obj` (same structure) at `ref_rows`, for every batched tensor.

    Keyword tensors named in `per_frame` (or lists of them: AnimateDiff ControlNet's residuals) hold
    `batch * frames` rows, each sample's frames together. A PerSampleList of `batch` items gives its items at
    `rows`, then `ref_obj`'s at `ref_rows`. Keywords in `batch_dims` are gathered on their own dimension."""
    dims = batch_dims or {}
    if isinstance(obj, dict) and per_frame:
        out = gather_rows(obj, ref_obj, rows, ref_rows, batch, unbatched + per_frame, batch_dims=batch_dims)
        for k in per_frame:
            if k in obj:
                out[k] = _per_frame_rows(obj[k], ref_obj[k], rows, ref_rows, batch)
        return out
    if isinstance(obj, PerSampleList):
        return PerSampleList(_items(obj, rows) + _items(ref_obj, ref_rows)) if len(obj) == batch else obj
    if isinstance(obj, torch.Tensor):
        if obj.ndim >= 1 and obj.shape[0] == batch:
            return torch.cat([obj[rows.to(obj.device)], ref_obj[ref_rows.to(obj.device)]])
        return obj
    if isinstance(obj, dict):
        return {k: (v if k in unbatched else rows_on_dim(k, dims[k], batch, (v, rows), (ref_obj[k], ref_rows))
                    if k in dims else gather_rows(v, ref_obj[k], rows, ref_rows, batch, unbatched,
                                                  batch_dims=batch_dims))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather_rows(v, r, rows, ref_rows, batch, unbatched, batch_dims=batch_dims)
                         for v, r in zip(obj, ref_obj))
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
    this way), or the tensor itself (Würstchen's prior returns one bare: indexing it would take sample 0). A list
    of per-sample predictions (Z-Image: one [C, 1, H, W] tensor per row) comes back stacked, one row each."""
    out = output if isinstance(output, torch.Tensor) else output[0]
    return torch.stack(out) if isinstance(out, list) else out


def replace_first(output: Any, tensor: torch.Tensor) -> Any:
    """`output` with its prediction replaced by `tensor`, in the denoiser's own structure (a list of per-sample
    predictions stays a list: one item per row of `tensor`)."""
    if not isinstance(output, torch.Tensor) and isinstance(output[0], list):
        tensor = list(tensor.unbind(0))
    if isinstance(output, tuple):
        return (tensor,) + tuple(output[1:])
    if isinstance(output, torch.Tensor):
        return tensor
    key = next(iter(output.keys()))
    return type(output)(**{**output, key: tensor})


def nan_rows(like: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.full((batch,) + tuple(like.shape[1:]), float("nan"), dtype=like.dtype, device=like.device)
