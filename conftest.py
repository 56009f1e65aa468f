"""Fixtures for the Python code blocks of README.md and docs/ (run by pytest-markdown-docs, `--markdown-docs`).

A block whose fence says ```python fixture:tiny_hub loads hub weights in its text; in the tests `from_pretrained`
of the diffusers classes the pages use returns a tiny pipeline built from configs instead (tests/pipeline_zoo.py),
so every block runs offline and fast.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

HUB_STAND_INS = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline")


@pytest.fixture
def tiny_hub(monkeypatch):
    import diffusers
    import torch
    from pipeline_zoo import build

    torch.manual_seed(0)
    for name in HUB_STAND_INS:
        monkeypatch.setattr(getattr(diffusers, name), "from_pretrained",
                            classmethod(lambda cls, *args, _name=name, **kwargs: build(_name)))


@pytest.fixture
def modular_sdxl():
    """A modular SDXL pipeline built from diffusers' own blocks on tiny components (tests/test_guider.py)."""
    from test_guider import _sdxl

    pipe, _, _ = _sdxl()
    pipe.set_progress_bar_config(disable=True)
    return pipe
