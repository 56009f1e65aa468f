"""The pipeline table covers diffusers: every class that runs guidance is exact (a tested row) or refused for
a reason of its own, and the support page says exactly what the table holds."""

import pytest

import diffusers
from pipelines.adapters import DIFFUSERS_ADAPTERS, REFUSED, adapter_for
from pipelines.support_table import (PAGE, ROOT, SUMMARY_END, SUMMARY_START, guided_pipeline_classes,
                                     summary_markdown, support_page_markdown, uninspectable_classes)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

# Stand-ins for classes whose optional backend is not a test dependency; each has a row all the same.
UNINSPECTABLE = {"AudioDiffusionPipeline", "ConsisIDPipeline", "OnnxStableDiffusionImg2ImgPipeline",
                 "OnnxStableDiffusionInpaintPipeline", "OnnxStableDiffusionPipeline",
                 "OnnxStableDiffusionUpscalePipeline", "SpectrogramDiffusionPipeline", "StableDiffusionOnnxPipeline"}
NO_GUIDANCE = {"AudioDiffusionPipeline", "SpectrogramDiffusionPipeline"}  # unconditional / no scale in their call


@pytest.fixture(scope="module")
def guided() -> dict:
    return guided_pipeline_classes()


def test_the_enumeration_finds_the_known_families(guided):
    assert {"StableDiffusionPipeline", "FluxPipeline", "WanPipeline", "KolorsPipeline",
            "HunyuanImagePipeline"} <= set(guided)  # HunyuanImage: a `guider` component, no scale keyword
    assert "DDPMPipeline" not in guided and not any(n.endswith("ModularPipeline") for n in guided)
    assert len(guided) >= 250


def test_every_class_that_runs_guidance_has_a_row(guided):
    missing = sorted(set(guided) - set(DIFFUSERS_ADAPTERS) - set(REFUSED))
    assert not missing, f"{len(missing)} diffusers classes have no row (exact or refused): {', '.join(missing)}"


def test_uninspectable_classes_are_known_and_have_rows():
    assert set(uninspectable_classes()) == UNINSPECTABLE, "a backend changed: inspect the new classes"
    missing = sorted(UNINSPECTABLE - NO_GUIDANCE - set(DIFFUSERS_ADAPTERS) - set(REFUSED))
    assert not missing


def test_rows_name_real_classes_and_none_is_both_exact_and_refused(guided):
    assert not set(DIFFUSERS_ADAPTERS) & set(REFUSED)
    unknown = sorted((set(DIFFUSERS_ADAPTERS) | set(REFUSED)) - set(guided) - UNINSPECTABLE)
    assert not unknown, f"rows for classes diffusers {diffusers.__version__} does not have: {unknown}"


def test_every_refusal_gives_its_own_reason():
    for name, why in REFUSED.items():
        assert why.startswith(("it ", "its ", "diffusion forcing ")) and 40 <= len(why) <= 400, (name, why)
        assert "not verified" not in why and "not supported" not in why, (name, why)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_apply_guidance_refuses_each_class_with_its_reason(name):
    cls = getattr(diffusers, name)
    with pytest.raises(TypeError) as info:
        adapter_for(object.__new__(cls))
    assert str(info.value) == f"pipe={name} cannot be guided by apply_guidance: {REFUSED[name]}"


def test_the_support_page_and_summary_are_generated_from_the_rows():
    hint = "run: python -m pipelines.support_table"
    assert PAGE.read_text() == support_page_markdown(), hint
    readme = (ROOT / "README.md").read_text()
    assert readme.split(SUMMARY_START, 1)[1].split(SUMMARY_END, 1)[0].strip() == summary_markdown(), hint
