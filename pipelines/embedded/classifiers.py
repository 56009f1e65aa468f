"""The two CIFAR-10 image classifiers of the embedded default model.

* `ResNetClassifier` is the *guidance* classifier: a small ResNet-9-style network (BatchNorm,
  residual blocks). Its non-linearities are `nn.ReLU` *modules* (never `F.relu`), built from the
  `activation` config key, so that EluCD can swap them module-wise for `nn.Softplus(beta)`.
* `ConvNetClassifier` is the independent *evaluation* classifier: a plain VGG-style conv net with
  different widths, depth and seed, so that guided samples are not scored by the network that
  guided them.

Both take images in [-1, 1] of shape (B, 3, 32, 32) and return logits (B, 10). A trained model is a
folder with `model.safetensors` and `config.json` (whose "architecture" key names the class);
`load_classifier(folder)` builds the right class and returns it frozen, in eval mode.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def make_activation(name: str = "relu", beta: float = 1.0) -> nn.Module:
    """A fresh activation module; "relu" (default), "softplus" (with `beta`), "silu", "elu", "gelu"."""
    name = name.lower()
    if name == "relu":
        return nn.ReLU()
    if name == "softplus":
        return nn.Softplus(beta=beta)
    if name == "silu":
        return nn.SiLU()
    if name == "elu":
        return nn.ELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"activation={name!r}: expected one of relu, softplus, silu, elu, gelu")


def make_norm(kind: str, channels: int, groups: int = 8) -> nn.Module:
    kind = kind.lower()
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    raise ValueError(f"norm={kind!r}: expected 'batch' or 'group'")


class _Classifier(nn.Module):
    """Shared interface: input range, size, classes, config, save()."""

    architecture: str = ""
    input_range = (-1.0, 1.0)
    image_size = 32
    num_classes = 10
    defaults: dict = {}

    def __init__(self, config: dict | None = None, **overrides) -> None:
        super().__init__()
        cfg = {**self.defaults, **(config or {}), **overrides}
        cfg.pop("architecture", None)
        unknown = set(cfg) - set(self.defaults)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown config keys {sorted(unknown)}")
        self.config = {"architecture": self.architecture, **cfg}
        self.num_classes = int(cfg.get("num_classes", 10))

    def _act(self) -> nn.Module:
        return make_activation(self.config.get("activation", "relu"), self.config.get("softplus_beta", 1.0))

    def _conv_bn_act(self, cin: int, cout: int) -> list[nn.Module]:
        norm = self.config.get("norm", "batch")
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            make_norm(norm, cout, self.config.get("norm_groups", 8)),
            self._act(),
        ]

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `model.safetensors` + `config.json` into `folder` (created if needed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"architecture": self.architecture})
        (folder / CONFIG_NAME).write_text(json.dumps(self.config, indent=2) + "\n")
        return folder


class _Residual(nn.Module):
    """x + f(x), f = two conv-norm-act layers of the same width."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNetClassifier(_Classifier):
    """ResNet-9-style guidance classifier (Page's DAWNBench net, narrower).

    stem conv -> for each stage: conv(width) + 2x2 pool [+ `blocks` residual blocks] -> global
    average pool -> linear. Default widths (16, 32, 64, 128), residual blocks after stages 1 and 3:
    ~0.41M parameters, ~25M multiply-adds per image.
    """

    architecture = "resnet"
    defaults = {
        "stem_width": 16,
        "widths": [32, 64, 128],
        "blocks": [1, 0, 1],
        "pool": "max",
        "norm": "batch",
        "norm_groups": 8,
        "activation": "relu",
        "softplus_beta": 1.0,
        "num_classes": 10,
    }

    def __init__(self, config: dict | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        c = self.config
        if len(c["widths"]) != len(c["blocks"]):
            raise ValueError("ResNetClassifier: 'widths' and 'blocks' must have the same length")
        pool = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[c["pool"]]
        layers: list[nn.Module] = self._conv_bn_act(3, c["stem_width"])
        cin = c["stem_width"]
        for width, blocks in zip(c["widths"], c["blocks"]):
            layers += [*self._conv_bn_act(cin, width), pool(2)]
            for _ in range(blocks):
                layers.append(_Residual(self._conv_bn_act(width, width) + self._conv_bn_act(width, width)))
            cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, self.num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ConvNetClassifier(_Classifier):
    """Plain VGG-style evaluation classifier: stages of conv-norm-act layers, each ending in a 2x2
    max pool, then global average pool -> linear. Default stages [[32], [64, 64], [128, 128]] after
    a 24-wide stem layer: ~0.28M parameters; no residual connections, different widths from the
    guidance classifier."""

    architecture = "convnet"
    defaults = {
        "stem_width": 24,
        "stages": [[32], [64, 64], [128, 128]],
        "norm": "batch",
        "norm_groups": 8,
        "activation": "relu",
        "softplus_beta": 1.0,
        "dropout": 0.0,
        "num_classes": 10,
    }

    def __init__(self, config: dict | None = None, **overrides) -> None:
        super().__init__(config, **overrides)
        c = self.config
        layers: list[nn.Module] = self._conv_bn_act(3, c["stem_width"]) if c["stem_width"] else []
        cin = c["stem_width"] or 3
        for stage in c["stages"]:
            for width in stage:
                layers += self._conv_bn_act(cin, width)
                cin = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if c["dropout"]:
            head.append(nn.Dropout(c["dropout"]))
        head.append(nn.Linear(cin, self.num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ARCHITECTURES: dict[str, type[_Classifier]] = {
    ResNetClassifier.architecture: ResNetClassifier,
    ConvNetClassifier.architecture: ConvNetClassifier,
}


def build_classifier(config: dict) -> _Classifier:
    """A freshly initialised classifier from a config dict with an "architecture" key."""
    arch = config.get("architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture={arch!r}: expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](config)


def load_classifier(folder: str | os.PathLike, device: str | torch.device = "cpu") -> _Classifier:
    """Load a classifier saved by `save()`: eval mode, gradients of the weights switched off."""
    folder = Path(folder)
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"classifier folder {str(folder)!r} lacks {', '.join(missing)}; export one with "
            "`python -m pipelines.embedded.training.train_classifier --config ... --out ... --export DIR`"
        )
    config = json.loads((folder / CONFIG_NAME).read_text())
    model = build_classifier(config)
    model.load_state_dict(load_file(str(folder / WEIGHTS_NAME), device="cpu"))
    return model.to(device).eval().requires_grad_(False)
