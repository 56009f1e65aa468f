"""The two CIFAR-10 image classifiers of the embedded default model.

* `ResNetClassifier` is the *guidance* classifier: a small ResNet-9-style network (BatchNorm,
  residual blocks). Its non-linearities are `nn.ReLU` *modules* (never `F.relu`), built from the
  `activation` config key, so that EluCD can swap them module-wise for `nn.Softplus(beta)`.
* `ConvNetClassifier` is the independent *evaluation* classifier: a plain VGG-style conv net with
  different widths, depth and seed, so that guided samples are not scored by the network that
  guided them.

Both take images in [-1, 1] of shape (B, 3, 32, 32) and return logits (B, 10). A trained model is a
folder (or a Hub repo) with `model.safetensors` and `config.json` (whose "architecture" key names the
class), written by `save_pretrained` of huggingface_hub's model mixin (`guidance.hub`);
`load_classifier(folder_or_repo)` builds the right class and returns it frozen, in eval mode.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from guidance.base import check_range
from guidance.hub import CONFIG_NAME, WEIGHTS_NAME, SafetensorsHubMixin, load_pretrained, read_config


def make_activation(name: str = "relu", beta: float = 1.0) -> nn.Module:
    """A fresh activation module; "relu" (default), "softplus" (with `beta`), "silu", "elu", "gelu"."""
    name = str(name).lower()
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
    kind = str(kind).lower()
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    raise ValueError(f"norm={kind!r}: expected 'batch' or 'group'")


def _sequence(name: str, value: Any) -> list:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name}={value!r}: expected a list")
    return list(value)


def _width(name: str, value: Any) -> int:
    """A positive int (numpy / torch integers accepted), or a ValueError naming the parameter."""
    if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < 1:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    return int(value)


class _Classifier(nn.Module, SafetensorsHubMixin, library_name="guidance-kit", tags=["image-classification"]):
    """Shared interface: input range, size, classes, config, `save_pretrained` / `from_pretrained`
    (huggingface_hub's mixin: `model.safetensors` + `config.json`, a folder or a Hub repo id)."""

    architecture: str = ""
    input_range = (-1.0, 1.0)
    image_size = 32

    def _setup(self, norm: str, norm_groups: int, activation: str, softplus_beta: float, num_classes: int) -> None:
        make_activation(activation), make_norm(norm, 8)  # validate the names early
        self.norm, self.norm_groups = str(norm).lower(), _width("norm_groups", norm_groups)
        self.activation = str(activation).lower()
        self.softplus_beta = check_range(type(self).__name__, "softplus_beta", softplus_beta, 0.0, low_open=True)
        self.num_classes = _width("num_classes", num_classes)

    @property
    def config(self) -> dict:
        """The arguments the model was built from, plus its "architecture" (what config.json holds)."""
        return dict(self._hub_mixin_config)

    def _act(self) -> nn.Module:
        return make_activation(self.activation, self.softplus_beta)

    def _conv_bn_act(self, cin: int, cout: int) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            make_norm(self.norm, cout, self.norm_groups),
            self._act(),
        ]


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

    def __init__(self, stem_width: int = 16, widths: Sequence[int] = (32, 64, 128), blocks: Sequence[int] = (1, 0, 1),
                 pool: str = "max", norm: str = "batch", norm_groups: int = 8, activation: str = "relu",
                 softplus_beta: float = 1.0, num_classes: int = 10) -> None:
        super().__init__()
        self._setup(norm, norm_groups, activation, softplus_beta, num_classes)
        stem_width = _width("stem_width", stem_width)
        widths = [_width("widths", w) for w in _sequence("widths", widths)]
        blocks = [int(b) for b in _sequence("blocks", blocks)]
        if len(widths) != len(blocks) or min(blocks, default=0) < 0:
            raise ValueError(f"ResNetClassifier: widths={widths} and blocks={blocks} must have the same length, "
                             "blocks >= 0")
        if pool not in ("max", "avg"):
            raise ValueError(f"pool={pool!r}: expected 'max' or 'avg'")
        self.set_config(architecture=self.architecture, stem_width=stem_width, widths=widths, blocks=blocks,
                        pool=pool, norm=self.norm, norm_groups=self.norm_groups, activation=self.activation,
                        softplus_beta=self.softplus_beta, num_classes=self.num_classes)
        pool_layer = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[pool]
        layers: list[nn.Module] = self._conv_bn_act(3, stem_width)
        cin = stem_width
        for width, n_blocks in zip(widths, blocks):
            layers += [*self._conv_bn_act(cin, width), pool_layer(2)]
            for _ in range(n_blocks):
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

    def __init__(self, stem_width: int = 24, stages: Sequence[Sequence[int]] = ((32,), (64, 64), (128, 128)),
                 norm: str = "batch", norm_groups: int = 8, activation: str = "relu", softplus_beta: float = 1.0,
                 dropout: float = 0.0, num_classes: int = 10) -> None:
        super().__init__()
        self._setup(norm, norm_groups, activation, softplus_beta, num_classes)
        stem_width = _width("stem_width", stem_width) if stem_width != 0 else 0  # 0: no stem layer
        stages = [[_width("stages", w) for w in _sequence("stages", stage)] for stage in _sequence("stages", stages)]
        dropout = check_range("ConvNetClassifier", "dropout", dropout, 0.0, 1.0, high_open=True)
        self.set_config(architecture=self.architecture, stem_width=stem_width, stages=stages, norm=self.norm,
                        norm_groups=self.norm_groups, activation=self.activation, softplus_beta=self.softplus_beta,
                        dropout=float(dropout), num_classes=self.num_classes)
        layers: list[nn.Module] = self._conv_bn_act(3, stem_width) if stem_width else []
        cin = stem_width or 3
        for stage in stages:
            for width in stage:
                layers += self._conv_bn_act(cin, width)
                cin = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if dropout:
            head.append(nn.Dropout(float(dropout)))
        head.append(nn.Linear(cin, self.num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ARCHITECTURES: dict[str, type[_Classifier]] = {
    ResNetClassifier.architecture: ResNetClassifier,
    ConvNetClassifier.architecture: ConvNetClassifier,
}
_EXPORT_HINT = ("export one with `python -m pipelines.embedded.training.train_classifier --config ... --out ... "
                "--export DIR`")


def _architecture(config: dict, source: str) -> type[_Classifier]:
    arch = config.get("architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{source}: architecture={arch!r}; expected one of {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[arch]
    unknown = sorted(set(config) - set(cls._hub_mixin_init_parameters) - {"architecture", "self"})
    if unknown:  # from_pretrained would ignore them: a typo must not silently build the default network
        raise ValueError(f"{source}: unknown config keys {unknown} for {cls.__name__}")
    return cls


def build_classifier(config: dict) -> _Classifier:
    """A freshly initialised classifier from a config dict with an "architecture" key."""
    if not isinstance(config, dict):
        raise ValueError(f"classifier config={config!r}; allowed: a dict with an 'architecture' key "
                         f"({', '.join(sorted(ARCHITECTURES))}) and that class's arguments")
    cls = _architecture(config, "classifier config")
    return cls(**{k: v for k, v in config.items() if k != "architecture"})


def load_classifier(source: str | os.PathLike, device: str | torch.device = "cpu", **hub_kwargs: Any) -> _Classifier:
    """A classifier saved with `save_pretrained` (a folder, or a Hub repo id 'owner/name'; `hub_kwargs`
    go to `huggingface_hub.hf_hub_download`, e.g. revision=...): eval mode, weights frozen."""
    config = read_config(source, "classifier", _EXPORT_HINT, **hub_kwargs)
    cls = _architecture(config, f"classifier {str(source)!r} ({CONFIG_NAME})")
    return load_pretrained(cls, source, "classifier", device, **hub_kwargs)


__all__ = ["ARCHITECTURES", "CONFIG_NAME", "ConvNetClassifier", "ResNetClassifier", "WEIGHTS_NAME",
           "build_classifier", "load_classifier"]
