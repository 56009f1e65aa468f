"""Keywords batched on another dimension than 0 (`Adapter.batch_dims`), on HiDream-I1 whose Llama-3 embeddings are
(layers, batch, tokens, dim), and Shap-E img2img, on tiny pipelines (tests/zoo_hidream.py).

The zoo's own tests (tests/test_pipeline_zoo.py) check exactness when every row is evaluated; here steps that
evaluate only some rows (one sample's unconditional branch, the guide model's conditional rows) are compared with
native calls of one sample each, so rows taken on the wrong dimension would fail."""

from dataclasses import replace

import pytest
import torch
from pipeline_zoo import build, call_kwargs  # first: it imports zoo_hidream among its families

import zoo_hidream

import diffusers
from guidance import APG, CFG, Autoguidance
from guidance.base import COND, UNCOND
from pipelines import apply_guidance
from pipelines.adapters import DIFFUSERS_ADAPTERS, Adapter
from pipelines.layouts.rows import gather_rows, select_rows

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread_per_module")]

HIDREAM, SHAP_E = "HiDreamImagePipeline", "ShapEImg2ImgPipeline"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def run(pipe, kwargs) -> torch.Tensor:
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]


class FirstSampleOnly(CFG):
    """CFG for sample 0; sample 1 asks for no unconditional row and takes its conditional prediction."""

    def branches(self, ctx):
        only_first = ctx.none()
        only_first[0] = True
        return {COND: ctx.all(), UNCOND: only_first}

    def guide(self, ctx, preds):
        first = ctx.evaluated[UNCOND].view(-1, *([1] * (preds[COND].ndim - 1)))
        return torch.where(first, super().guide(ctx, preds), preds[COND])


# --- the row helpers ----------------------------------------------------------------------------------------
def test_rows_on_another_dimension_are_selected_and_gathered_there():
    n, rows, ref_rows = 4, torch.tensor([0, 3]), torch.tensor([2])
    layers = torch.arange(3 * n * 2.0).reshape(3, n, 2)  # (layers, batch, dim)
    kwargs = {"llama": layers, "t5": torch.arange(n * 2.0).reshape(n, 2), "extra": {"llama": layers}}
    dims = {"llama": 1}
    picked = select_rows(kwargs, rows, n, (), dims)
    assert torch.equal(picked["llama"], layers[:, rows]) and picked["llama"].is_contiguous()
    assert torch.equal(picked["t5"], kwargs["t5"][rows]) and torch.equal(picked["extra"]["llama"], layers[:, rows])
    gathered = gather_rows(kwargs, kwargs, rows, ref_rows, n, (), (), dims)
    assert torch.equal(gathered["llama"], layers[:, [0, 3, 2]]) and torch.equal(gathered["t5"], kwargs["t5"][[0, 3, 2]])
    assert select_rows({"llama": None}, rows, n, (), dims) == {"llama": None}
    assert torch.equal(select_rows(kwargs, rows, n, ("llama",), dims)["llama"], layers)  # unbatched wins
    with pytest.raises(ValueError, match=r"keyword llama=\(3, 5, 2\) is declared batched on dimension 1 "
                                         r"\(Adapter.batch_dims\), but it does not hold the call's 4 rows"):
        select_rows({"llama": torch.zeros(3, 5, 2)}, rows, n, (), dims)


def test_batch_dims_is_checked_and_kept_hashable():
    adapter = Adapter("transformer", "uncond_cond", "guidance_scale", "hint", batch_dims={"b": 2, "a": 1})
    assert adapter.batch_dims == (("a", 1), ("b", 2)) and adapter.batch_dim_of == {"a": 1, "b": 2}
    hash(adapter)
    for bad in ({"a": -1}, {"a": 1.0}, {1: 1}, ["a"]):
        with pytest.raises(ValueError, match=r"Adapter: batch_dims=.* is invalid; allowed: a dict of keyword"):
            Adapter("transformer", "uncond_cond", "guidance_scale", "hint", batch_dims=bad)


# --- partial rows against one-sample native calls ----------------------------------------------------------------
def _one_sample(name: str, kwargs: dict, i: int, latents: torch.Tensor) -> dict:
    """Sample i's inputs alone (HiDream's Llama-3 embeddings sliced on their batch dimension 1)."""
    one = {k: (v[:, i: i + 1] if "llama3" in k else v[i: i + 1]) if torch.is_tensor(v) else v
           for k, v in kwargs.items()}
    return {**one, "latents": latents[i: i + 1]}


def _latents(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if name == HIDREAM:
        return torch.randn(2, 4, 16, 16, generator=g)
    return torch.randn(2, 32 * 16, generator=g)  # Shap-E: (batch, num_embeddings * embedding_dim), unscaled


# Native calls of one sample and of two already differ by float32 rounding (measured: HiDream 7.6e-7, Shap-E 2.5e-5,
# its Karras sigmas up to ~160 amplify it); rows taken wrongly differ by O(1).
@pytest.mark.parametrize("name, tolerance", [(HIDREAM, 1e-5), (SHAP_E, 1e-4)])
def test_a_step_on_some_rows_equals_each_samples_own_native_call(name, tolerance):
    pipe, kwargs = build(name), call_kwargs(name)
    latents = _latents(name)
    guided = run(pipe, {**_one_sample(name, kwargs, 0, latents), "latents": latents[:1]})
    cond_only = run(pipe, {**_one_sample(name, kwargs, 1, latents), "guidance_scale": 1.0})
    with apply_guidance(pipe, FirstSampleOnly()) as handle:
        hooked = run(pipe, {**kwargs, "latents": latents})
    assert handle.nfe[0] == 2 * handle.nfe[1]  # sample 1's unconditional rows were never evaluated
    assert relative_error(hooked[:1], guided) <= tolerance and relative_error(hooked[1:], cond_only) <= tolerance


def test_hidream_rows_taken_on_dimension_0_would_not_match(monkeypatch):
    """The control: without batch_dims (the hook's dimension-0 rule) the same steps fail or differ."""
    pipe, kwargs = build(HIDREAM), call_kwargs(HIDREAM)
    latents = _latents(HIDREAM)
    guided = run(pipe, _one_sample(HIDREAM, kwargs, 0, latents))
    monkeypatch.setitem(DIFFUSERS_ADAPTERS, HIDREAM, replace(DIFFUSERS_ADAPTERS[HIDREAM], batch_dims=()))
    try:
        with apply_guidance(pipe, FirstSampleOnly()):
            hooked = run(pipe, {**kwargs, "latents": latents})
    except (IndexError, RuntimeError, ValueError):
        return
    assert relative_error(hooked[:1], guided) > 1e-3


def test_hidream_guide_branch_takes_the_conditional_llama_rows():
    """The guide model's rows (pipelines/branches) come from the conditional half on dimension 1: with the
    denoiser as its own guide, autoguidance is the conditional prediction, i.e. the native unguided call."""
    pipe, kwargs = build(HIDREAM), call_kwargs(HIDREAM)
    native_cond = run(pipe, {**kwargs, "guidance_scale": 1.0})
    with apply_guidance(pipe, Autoguidance(), guide_model=pipe.transformer) as handle:
        hooked = run(pipe, kwargs)
    assert handle.guide_nfe_per_sample == 3 and handle.nfe_per_sample == 3
    assert relative_error(hooked, native_cond) <= 1e-5


# --- HiDream's own scheduler, and the timestep it passes as `timesteps` ----------------------------------------------
def test_hidream_is_exact_on_its_unipc_flow_scheduler_and_reads_its_timesteps():
    """HiDream-I1 ships UniPC with flow sigmas (the pipeline sets its timesteps without mu): CFG and
    APG(eta=1, r=0, beta=0) equal the native call; the strategy sees the timestep the transformer receives."""
    scheduler = diffusers.UniPCMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
                                                  prediction_type="flow_prediction")
    pipe, kwargs = zoo_hidream.hidream(scheduler), call_kwargs(HIDREAM)
    native = run(pipe, kwargs)
    seen = []

    class Spy(CFG):
        def guide(self, ctx, preds):
            seen.append((ctx.timestep, float(ctx.sigma.flatten()[0])))
            return super().guide(ctx, preds)

    with apply_guidance(pipe, Spy()):
        assert relative_error(run(pipe, kwargs), native) <= 1e-5
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    assert [t for t, _ in seen] == pytest.approx(timesteps)
    assert [s for _, s in seen] == pytest.approx([float(s) for s in pipe.scheduler.sigmas[: len(seen)]], rel=1e-6)
    with apply_guidance(pipe, APG(eta=1.0, norm_threshold=0.0, momentum=0.0)):
        assert relative_error(run(pipe, kwargs), native) <= 1e-4
