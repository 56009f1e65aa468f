"""The embedded model's autoguidance guide: its training config, its export, its shipped weights."""

import json
import shutil

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel

from pipelines.embedded import WEIGHTS_DIR, load_embedded_guide
from pipelines.embedded.training.common import save_checkpoint
from pipelines.embedded.training.train_unet import build_unet, export

CONFIGS = WEIGHTS_DIR.parent / "training" / "configs"


def config(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_guide_config_is_a_smaller_shorter_trained_main_model():
    main, guide = config("unet.json"), config("guide_unet.json")
    # Autoguidance needs the same input, output, conditioning and noise schedule (paper: same family)...
    for key in ("sample_size", "in_channels", "out_channels", "num_class_embeds"):
        assert guide["unet"][key] == main["unet"][key], key
    assert guide["scheduler"] == main["scheduler"]
    assert guide["label_dropout"] == main["label_dropout"] and guide["batch_size"] == main["batch_size"]
    # ... and a degraded model: reduced capacity and a fraction of the main model's 3,521 steps.
    ratio = n_params(build_unet(guide)) / n_params(build_unet(main))
    assert 0.2 < ratio < 0.3
    assert guide["steps"] < 3521 / 2


def test_export_unet_layout_writes_the_ema_weights(tmp_path):
    cfg = config("guide_unet.json")
    unet = build_unet(cfg)
    ema = EMAModel(unet.parameters(), decay=cfg["ema_decay"])
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)  # the live weights move away from the EMA ones: export must take the EMA
    save_checkpoint(tmp_path / "run" / "checkpoint.pt",
                    {"unet": unet.state_dict(), "ema": ema.state_dict(), "step": 7, "seconds": 3.0})
    export(cfg, tmp_path / "run", tmp_path / "guide")
    assert (tmp_path / "guide" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = UNet2DModel.from_pretrained(tmp_path / "guide", use_safetensors=True)
    for shadow, p in zip(ema.shadow_params, loaded.parameters()):
        assert torch.equal(shadow, p)
    info = json.loads((tmp_path / "guide" / "training.json").read_text())
    assert info["steps"] == 7 and info["config"]["export_layout"] == "unet"
    with pytest.raises(ValueError, match="export_layout='zip' in the config; allowed: 'pipeline', 'unet'"):
        export({**cfg, "export_layout": "zip"}, tmp_path / "run", tmp_path / "other")


@pytest.fixture(scope="module")
def main_unet():
    return UNet2DModel.from_pretrained(WEIGHTS_DIR / "pipeline" / "unet", use_safetensors=True).eval()


@pytest.fixture(scope="module")
def guide():
    torch.set_num_threads(1)
    return load_embedded_guide("cpu")


def test_shipped_guide_fits_the_main_model(guide, main_unet):
    for key in ("sample_size", "in_channels", "out_channels", "num_class_embeds"):
        assert guide.config[key] == main_unet.config[key], key
    assert n_params(guide) < n_params(main_unet) / 3
    assert not guide.training and next(guide.parameters()).dtype == torch.float32
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([100, 500, 900]), torch.tensor([3, 7, 10])  # 10: the null class
    with torch.no_grad():
        ours, theirs = guide(x, t, class_labels=y).sample, main_unet(x, t, class_labels=y).sample
    assert ours.shape == theirs.shape and torch.isfinite(ours).all()
    assert (ours - theirs).abs().mean() > 1e-2  # a different (worse) model, not a copy


def test_guide_dtype_and_missing_or_unsafe_weights(tmp_path):
    assert next(load_embedded_guide("cpu", torch.float64).parameters()).dtype == torch.float64
    with pytest.raises(FileNotFoundError, match="the embedded guide model not found"):
        load_embedded_guide("cpu", weights_dir=tmp_path)
    # Pickled weights only (no safetensors): refused, never unpickled.
    (tmp_path / "guide").mkdir()
    shutil.copy(WEIGHTS_DIR / "guide" / "config.json", tmp_path / "guide" / "config.json")
    torch.save({}, tmp_path / "guide" / "diffusion_pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_embedded_guide("cpu", weights_dir=tmp_path)
