"""Layouts and refusals: what the hook refuses, and why; how it tells sequential calls apart."""

from pathlib import Path

import pytest
import torch
from pipeline_zoo import build, call_kwargs
from tiny_pipelines import build as build_tiny, call_kwargs as tiny_kwargs

import diffusers
from guidance import CFG, GFCG
from pipelines import Adapter, apply_guidance, register_adapter
from pipelines.adapters import EXTRA_ADAPTERS, REFUSED
from pipelines.layouts import batched

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.mark.parametrize("name", ["FluxFillPipeline", "FluxControlPipeline"])
def test_distilled_guidance_pipelines_are_refused_with_the_reason(name):
    cls = getattr(diffusers, name)
    parts = {k: v for k, v in build_tiny("flux").components.items() if k in cls.__init__.__code__.co_varnames}
    pipe = cls(**parts)
    assert name in REFUSED
    with pytest.raises(TypeError, match=rf"{name} cannot be guided.*distilled guidance embedding only.*true_cfg_scale"):
        apply_guidance(pipe, CFG())


def test_a_subclass_of_a_supported_class_is_refused_until_registered():
    class MyPipeline(diffusers.StableDiffusionPipeline):
        pass

    pipe = MyPipeline(**build_tiny("sd").components)
    with pytest.raises(TypeError, match="MyPipeline is not in guidance-kit's pipeline table \\(a subclass of diffusers' "
                                         "StableDiffusionPipeline: a row does not carry over.*register_adapter"):
        apply_guidance(pipe, CFG())


def test_reference_branch_refused_before_any_step_on_a_text_pipeline():
    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 3)

    pipe = build_tiny("sd")
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with apply_guidance(pipe, GFCG(Constant(), scale=1.0, adaptive="constant", target=[0, 0])):
        # (no prompt_template: no reference prompt to swap in; with one, tests/test_gfcg_text.py)
        with pytest.raises(ValueError, match="StableDiffusionPipeline has no class ids, so the reference-class branch"):
            pipe(**tiny_kwargs("sd"), generator=torch.Generator().manual_seed(0))
    assert calls == []


def test_wan22_second_scale_of_one_is_refused():
    name = "WanPipeline[2.2 two experts]"
    pipe = build(name)
    with apply_guidance(pipe, CFG()):
        with pytest.raises(ValueError, match="guidance_scale_2=1.0 makes the pipeline ignore"):
            pipe(**{**call_kwargs(name), "guidance_scale_2": 1.0})


def test_batched_layout_reads_the_device_once_per_call(monkeypatch):
    pipe = build_tiny("sd")
    seen = []
    real_equal = torch.equal
    monkeypatch.setattr(batched.torch, "equal", lambda a, b: seen.append(1) or real_equal(a, b))
    with apply_guidance(pipe, CFG()):
        for _ in range(2):
            pipe(**tiny_kwargs("sd"), generator=torch.Generator().manual_seed(0))
    assert len(seen) == 2  # one check per pipeline call, not one per step (3 steps each)


# --- a minimal sequential pipeline without cache_context ------------------------------------------------
class _Denoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        return (self.proj(hidden_states) * (1 + timestep.view(-1, 1, 1) / 1000) + encoder_hidden_states,)


class TwoCallPipeline:
    """cond then uncond per step, no cache_context (like Flux img2img); `copy_latents` breaks the
    shared-tensor rule, as a pipeline that rebuilt its input for the second call would."""

    def __init__(self):
        torch.manual_seed(0)
        self.transformer = _Denoiser()
        self.scheduler = diffusers.FlowMatchEulerDiscreteScheduler()

    def __call__(self, guidance_scale: float = 4.0, copy_latents: bool = False, num_inference_steps: int = 3):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 5, 4, generator=g)
        cond, uncond = torch.randn(2, 5, 4, generator=g), torch.zeros(2, 5, 4)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            tt = t.expand(2)
            c = self.transformer(hidden_states=x, timestep=tt, encoder_hidden_states=cond)[0]
            u = self.transformer(hidden_states=x.clone() if copy_latents else x, timestep=tt,
                                 encoder_hidden_states=uncond)[0]
            x = self.scheduler.step(u + guidance_scale * (c - u), t, x).prev_sample
        return x


@pytest.fixture
def two_call_pipeline():
    register_adapter(TwoCallPipeline, Adapter("transformer", "sequential_call_order", "guidance_scale", "hint",
                                              sample_kw="hidden_states"))
    yield TwoCallPipeline()
    EXTRA_ADAPTERS.pop(TwoCallPipeline)


def test_call_order_layout_is_exact_and_refuses_calls_it_cannot_pair(two_call_pipeline):
    pipe = two_call_pipeline
    native = pipe()
    with apply_guidance(pipe, CFG()) as handle:
        assert torch.allclose(pipe(), native, rtol=1e-5, atol=1e-6)
        assert handle.nfe.tolist() == [6, 6]
        with pytest.raises(RuntimeError, match="no unconditional call followed the conditional one"):
            pipe(copy_latents=True)


def test_pag_on_is_refused_with_the_keyword_to_change():
    name = "StableDiffusionPAGPipeline"
    pipe = build(name)
    with apply_guidance(pipe, CFG()):
        with pytest.raises(ValueError, match=r"pag_scale=3.0.*call with pag_scale off"):
            pipe(**{**call_kwargs(name), "pag_scale": 3.0})


@pytest.mark.parametrize("name", ["FluxPipeline"])  # the cache needs the pipeline's own cache_context
def test_composes_with_first_block_cache(name):
    """diffusers' FirstBlockCache (a stateful hook keyed by cache_context) under the guidance hook: CFG through
    the hook equals native CFG with the same cache, and removing both leaves the pipeline as it was."""
    from diffusers.hooks import FirstBlockCacheConfig

    pipe, kwargs = build(name), call_kwargs(name)
    kwargs["num_inference_steps"] = 6  # enough steps for the cache to skip some blocks
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    native = pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]
    with apply_guidance(pipe, CFG()):
        hooked = pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]
    assert ((hooked - native).abs().max() / native.abs().max()).item() <= 1e-5
    pipe.transformer.disable_cache()
    uncached = pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]
    assert not torch.equal(uncached, native)  # the cache did skip work


def test_per_sample_lists_give_whole_items_and_other_lists_keep_their_rule():
    """A list the hook marks as per-sample (Z-Image's latents and captions: one tensor per row) has its items
    selected, never their insides, even where an item's leading dim equals the batch; a plain list of the batch's
    length (ControlNet residuals: one tensor per block, each with the batch's rows) keeps the row rule."""
    from pipelines.layouts.rows import (PerSampleList, first, gather_rows, mark_per_sample_lists, replace_first,
                                        select_rows)

    n, rows, ref_rows = 4, torch.tensor([1, 3]), torch.tensor([0])
    items = [torch.full((n, 5), float(i)) for i in range(n)]  # leading dim == batch: no recursion into them
    args, kwargs = mark_per_sample_lists((items, torch.arange(n), (items[0],)), {"cap": list(items), "x": [1]}, n)
    assert type(args[0]) is PerSampleList and type(kwargs["cap"]) is PerSampleList
    assert type(args[2]) is tuple and kwargs["x"] == [1] and type(kwargs["x"]) is list  # tuples, other lengths
    picked = select_rows(args, rows, n)
    assert [t[0, 0].item() for t in picked[0]] == [1.0, 3.0] and all(t.shape == (n, 5) for t in picked[0])
    assert picked[1].tolist() == [1, 3] and picked[2][0].shape == (2, 5)
    gathered = gather_rows(kwargs, kwargs, rows, ref_rows, n)["cap"]
    assert type(gathered) is PerSampleList and [t[0, 0].item() for t in gathered] == [1.0, 3.0, 0.0]

    residuals = [torch.arange(n * 2.0).reshape(n, 2) + 10 * i for i in range(n)]  # plain list, len == batch
    for out in (select_rows(residuals, rows, n), gather_rows(residuals, residuals, rows, rows[:0], n)):
        assert type(out) is list and len(out) == n and all(torch.equal(o, r[rows]) for o, r in zip(out, residuals))

    output = ([torch.full((3, 1, 2, 2), float(i)) for i in range(n)],)  # the transformer's list, one per row
    stacked = first(output)
    assert stacked.shape == (n, 3, 1, 2, 2) and stacked[2, 0, 0, 0, 0].item() == 2.0
    back = replace_first(output, -stacked)
    assert type(back) is tuple and type(back[0]) is list and len(back[0]) == n and back[0][3][0, 0, 0, 0] == -3.0


@pytest.mark.parametrize("keyword, value, message", [
    ("cfg_truncation", 0.5, r"cfg_truncation=0.5: the pipeline then drops its unconditional batch part-way.*"
                            r"allowed: cfg_truncation >= 1"),
    ("cfg_normalization", 1.5, r"cfg_normalization=1.5.*call with cfg_normalization off"),
    ("guidance_scale", 0.0, r"guidance_scale=0.0, so it runs no unconditional branch.*guidance_scale > 0"),
])
def test_z_image_options_it_cannot_guide_are_refused_before_any_step(keyword, value, message):
    name = "ZImagePipeline"
    pipe, calls = build(name), []
    pipe.transformer.register_forward_pre_hook(lambda *args: calls.append(1))
    with apply_guidance(pipe, CFG()):
        with pytest.raises(ValueError, match=message):
            pipe(**{**call_kwargs(name), keyword: value})
    assert calls == []
