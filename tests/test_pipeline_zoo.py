"""Every class in the adapter table, on a tiny pipeline: the hook is exact, counts what it evaluates,
and leaves no trace. One parametrised test per class (a few pipeline calls each)."""

import pytest
import torch
from pipeline_zoo import CASES, build, call_kwargs, denoisers

from guidance import APG, CFG, Interval
from pipelines import apply_guidance
from pipelines.adapters import DIFFUSERS_ADAPTERS, adapter_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(pipe, kwargs) -> torch.Tensor:
    torch.manual_seed(0)
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]


def count_rows(pipe) -> dict:
    """Wrap each denoiser's forward (below the hook) to count the rows it really evaluates."""
    counter = {"rows": 0}
    sample_kw = adapter_for(pipe).sample_kw
    for module in denoisers(pipe):
        original = module.forward

        def counting_forward(*args, _original=original, **kwargs):
            counter["rows"] += (args[0] if args else kwargs[sample_kw]).shape[0]
            return _original(*args, **kwargs)

        module.forward = counting_forward
    return counter


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_every_adapter_row_has_a_tiny_pipeline():
    assert sorted(DIFFUSERS_ADAPTERS) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hook_is_exact_counts_rows_and_leaves_no_trace(name):
    pipe, kwargs = build(name), call_kwargs(name)
    assert type(pipe).__name__ == name
    native = run(pipe, kwargs)
    counter = count_rows(pipe)
    with apply_guidance(pipe, CFG()) as handle:
        hooked = run(pipe, kwargs)
    assert relative_error(hooked, native) <= 1e-5
    steps = int(handle.nfe[0]) // 2
    assert steps >= 2 and handle.nfe.tolist() == [2 * steps] * native.shape[0]
    assert counter["rows"] == int(handle.nfe.sum())

    with apply_guidance(pipe, APG(eta=1.0, norm_threshold=0.0, momentum=0.0)):
        assert relative_error(run(pipe, kwargs), native) <= 1e-5

    counter["rows"] = 0
    with apply_guidance(pipe, Interval(CFG(), start=0.0, stop=0.34)) as handle:  # unconditional rows on step 0 only
        interval = run(pipe, kwargs)
    assert handle.nfe.tolist() == [steps + 1] * native.shape[0]
    assert counter["rows"] == int(handle.nfe.sum())
    assert torch.isfinite(interval).all() and not torch.equal(interval, native)

    assert torch.equal(run(pipe, kwargs), native), "removal must restore bit-identical behaviour"
    assert type(pipe).__name__ == name and all("guidance_kit" not in str(m._diffusers_hook.hooks)
                                              for m in denoisers(pipe) if hasattr(m, "_diffusers_hook"))
