"""Save / load small torch models as `model.safetensors` + `config.json`, locally or on the Hub.

`SafetensorsHubMixin` is huggingface_hub's `PyTorchModelHubMixin` (which brings `save_pretrained`,
`from_pretrained` from a folder or a Hub repo id, and `push_to_hub`) with three loading rules of
ours, which is why `_from_pretrained` is overridden:

* weights come only from `model.safetensors` (the stock mixin falls back to a pickled
  `pytorch_model.bin` on the Hub);
* loading is strict (the stock default `strict=False` would leave missing weights at their random
  initialisation without a word);
* nothing is printed (the stock one prints "Loading weights from local directory" on stdout, which
  would mix into the CLI's output).

Subclasses call `self.set_config(...)` at the end of `__init__` with their normalised arguments, so
`config.json` holds what the model was built from (the stock mixin records the raw arguments and
silently drops those that are not JSON types, e.g. numpy integers).

Used by `guidance.evaluators.NoiseAwareNet` and `pipelines.embedded.classifiers`; no diffusers here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import PyTorchModelHubMixin, hf_hub_download

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class SafetensorsHubMixin(PyTorchModelHubMixin):
    """`PyTorchModelHubMixin`, loading only `model.safetensors`, strictly, silently."""

    def set_config(self, **config: Any) -> None:
        """What `save_pretrained` writes to config.json (JSON types only)."""
        json.dumps(config)  # fails here, naming the type, rather than at save time
        self._hub_mixin_config = config

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         map_location: str = "cpu", strict: bool = True, **model_kwargs):
        model = cls(**model_kwargs)
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, WEIGHTS_NAME)
        else:
            weights = hf_hub_download(repo_id=model_id, filename=WEIGHTS_NAME, revision=revision,
                                      cache_dir=cache_dir, force_download=force_download, token=token,
                                      local_files_only=local_files_only)
        return cls._load_as_safetensor(model, weights, map_location, strict)


def read_config(source: str | os.PathLike, what: str, hint: str, **hub_kwargs: Any) -> dict:
    """config.json of a local model folder or a Hub repo id, with errors that name `source`.

    what: the kind of model, for messages ("classifier", "evaluator"); hint: how to make one."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{what}={source!r} is a {type(source).__name__}; allowed: a folder path or a Hub repo id "
                        "'owner/name'")
    path = Path(source)
    if path.is_dir():
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{what} folder {str(source)!r} lacks {', '.join(missing)}; {hint}")
        config_file = path / CONFIG_NAME
    elif path.exists() or os.path.isabs(source) or str(source).startswith((".", "~")) or str(source).count("/") > 1:
        raise FileNotFoundError(f"{what}={str(source)!r} is not a folder (expected one holding {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}, or a Hub repo id 'owner/name'); {hint}")
    else:
        try:
            config_file = Path(hf_hub_download(repo_id=str(source), filename=CONFIG_NAME, **hub_kwargs))
        except Exception as e:  # no network, unknown repo, bad repo id: one clear line
            raise FileNotFoundError(f"{what}={str(source)!r}: no local folder of that name, and the Hub repo could "
                                    f"not be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                    f"{hint}") from None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} config {str(config_file)!r} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{what} config {str(config_file)!r} must hold a JSON object, got {type(config).__name__}")
    return config


def load_pretrained(cls: type, source: str | os.PathLike, what: str, device: Any = "cpu", **hub_kwargs: Any):
    """`cls.from_pretrained(source)` frozen in eval mode on `device`; a weights file that does not fit
    the config (missing or unexpected tensors, other shapes, not safetensors) is a ValueError naming it."""
    import torch
    from safetensors import SafetensorError

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what}: device={device!r} is not a device name; allowed: cpu, cuda, cuda:N, mps") from None
    try:
        model = cls.from_pretrained(str(source), **hub_kwargs)
    except (RuntimeError, SafetensorError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{what} {str(source)!r}: {WEIGHTS_NAME} does not fit its {CONFIG_NAME} or is not a "
                         f"safetensors file ({first})") from None
    return model.to(device).eval().requires_grad_(False)
