"""The guide model: a second denoiser that strategies reach through the GUIDE branch (autoguidance).

`apply_guidance(pipe, strategy, guide_model=model)` takes the model object; a strategy may instead
name a guide model registered here (`Autoguidance(guide_model="embedded")`), so that configs can
refer to it. The object lives on this side: guidance/ never holds a model.

A guide model must be a drop-in for the pipeline's denoiser: the hook calls it with exactly the
arguments of the conditional call (noisy input, timestep, class ids / text embeddings, ...), so it
must take the same inputs and predict the same quantity. `check_guide_model` compares what the
configs say up front; `check_placement` compares device and dtype at every call.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from guidance.base import GuidanceStrategy

from .skip_layer import NAME_PREFIX, SkipLayerGuide

# Name -> loader of a registered guide model (the embedded package registers "embedded").
GUIDE_MODELS: dict[str, Callable[[], torch.nn.Module]] = {}

# Config entries that define what a denoiser takes and returns: a guide model must agree on every
# one both configs hold (capacity entries such as block_out_channels or num_layers may differ).
INTERFACE_KEYS = (
    "in_channels", "out_channels", "sample_size", "patch_size", "num_class_embeds", "class_embed_type",
    "num_embeds_ada_norm",
    "cross_attention_dim", "encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type",
    "projection_class_embeddings_input_dim", "joint_attention_dim", "pooled_projection_dim",
    "caption_channels", "text_embed_dim", "time_cond_proj_dim", "num_train_timesteps", "prediction_type",
)


def register_guide_model(name: str, loader: Callable[[], torch.nn.Module]) -> None:
    """Let strategies name a guide model (`Autoguidance(guide_model=name)`); `loader()` returns it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_guide_model: name={name!r}; allowed: a non-empty string")
    if name.startswith(NAME_PREFIX):
        raise ValueError(f"register_guide_model: name={name!r}; allowed: a name not starting with {NAME_PREFIX!r} "
                         "(reserved for SkipLayerGuide)")
    GUIDE_MODELS[name] = loader


def uses_guide_model(strategy: GuidanceStrategy) -> bool:
    """Whether the strategy, or one it wraps (Interval, GFCG's inner, ...), may ask for the GUIDE branch."""
    return bool(getattr(strategy, "uses_guide_model", False)) or any(
        uses_guide_model(c) for c in strategy.wrapped_strategies())


def named_guide_models(strategy: GuidanceStrategy) -> set[str]:
    """Guide model names held by the strategy tree (`guide_model` fields that are strings)."""
    names = {strategy.guide_model} if isinstance(getattr(strategy, "guide_model", None), str) else set()
    for child in strategy.wrapped_strategies():
        names |= named_guide_models(child)
    return names


_LOADED: dict[str, tuple[Callable, torch.nn.Module]] = {}  # name -> (its loader, the model it loaded)


def load_guide_model(name: str) -> torch.nn.Module:
    """The registered guide model `name`, loaded once per process (the batch runner applies a strategy
    per batch; the weights are read the first time only)."""
    if name.startswith(NAME_PREFIX):  # "skip-layers:7,8": the denoiser itself, blocks skipped (skip_layer.py)
        return SkipLayerGuide.from_name(name)
    if name not in GUIDE_MODELS:
        raise ValueError(f"guide_model={name!r} is not a registered guide model; allowed: "
                         f"{', '.join(sorted(GUIDE_MODELS)) or '(none registered)'}, "
                         f"'{NAME_PREFIX}<i>,<j>' (SkipLayerGuide), "
                         "or pass the model object to apply_guidance(pipe, strategy, guide_model=model)")
    loader = GUIDE_MODELS[name]
    if name not in _LOADED or _LOADED[name][0] is not loader:
        _LOADED[name] = (loader, loader())
    return _LOADED[name][1]


def _config(module: torch.nn.Module) -> dict:
    config = getattr(module, "config", None)
    return dict(config) if config is not None else {}


def _same(a: Any, b: Any) -> bool:
    return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)


def check_guide_model(guide: Any, denoiser: torch.nn.Module, pipe_name: str, prediction_type: str | None) -> None:
    """Refuse, before any step runs, a guide model that cannot stand in for the pipeline's denoiser."""
    if not isinstance(guide, torch.nn.Module):
        raise TypeError(f"guide_model={type(guide).__name__} is not a torch.nn.Module; allowed: a denoiser of the "
                        f"same family as {pipe_name}'s {type(denoiser).__name__} (e.g. loaded with from_pretrained)")
    if guide is denoiser:
        return
    main, other = _config(denoiser), _config(guide)
    for key in INTERFACE_KEYS:
        if key in main and key in other and not _same(main[key], other[key]):
            raise ValueError(
                f"guide_model: {type(guide).__name__} has {key}={other[key]!r} but {pipe_name}'s denoiser "
                f"{type(denoiser).__name__} has {key}={main[key]!r}; allowed: a guide model that takes the same "
                f"inputs and predicts the same output (a smaller or shorter-trained model of the same family)"
            )
    guide_type = other.get("prediction_type")
    if guide_type is not None and prediction_type is not None and guide_type != prediction_type:
        raise ValueError(f"guide_model predicts {guide_type!r} but {pipe_name}'s scheduler expects "
                         f"{prediction_type!r}; "
                         "allowed: a guide model trained with the same prediction type and noise schedule")


def check_placement(guide: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None, pipe_name: str) -> None:
    """The guide must sit where the denoiser runs: same device as the input, same dtype as the denoiser."""
    p = next(guide.parameters(), None)
    if p is None:
        return
    if p.device != x.device or (dtype is not None and p.dtype != dtype):
        raise ValueError(
            f"guide_model is on {p.device} in {p.dtype} but {pipe_name}'s denoiser runs on {x.device} in {dtype}; "
            f"move it first: guide_model.to({str(x.device)!r}, {dtype})"
        )


def check_arguments(guide: torch.nn.Module, kwargs: dict, pipe_name: str) -> None:
    """The guide receives the conditional call's keywords: refuse one whose forward cannot take them all
    (e.g. a UNet2DModel guiding a text-conditioned UNet2DConditionModel) with the names it lacks."""
    params = inspect.signature(guide.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    missing = sorted(set(kwargs) - {p.name for p in params})
    if missing:
        raise ValueError(f"guide_model {type(guide).__name__}.forward takes no {', '.join(missing)}, which {pipe_name} "
                         "passes to its denoiser; allowed: a guide model of the denoiser's family (same inputs)")
