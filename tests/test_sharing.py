"""Strategies and handles under sharing and odd life cycles: what is not safe is refused with a clear error,
never run half-guided (issue 27, item 4). A second call is made to overlap the first by starting it from a step
callback of the first (the same thread) or while the first waits in its callback (another thread)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from guidance import APG, CFG
from pipelines import apply_guidance, load_embedded

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def pipes():
    return load_embedded("cpu").pipe, load_embedded("cpu").pipe


def call(pipe, **kw):
    return pipe(class_labels=[0, 1], num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                generator=torch.Generator().manual_seed(0), **kw).images


def overlapped(first, second):
    """Run first(callback) in a thread; its callback runs second() while the first call is at step 1.
    Returns the exception second() raised (None if it ran)."""
    seen: dict = {}

    def callback(pipe, i, t, tensors):
        if i == 1 and "error" not in seen:
            try:
                second()
                seen["error"] = None
            except Exception as e:  # noqa: BLE001 - the test inspects it
                seen["error"] = e
        return {}

    worker = threading.Thread(target=first, args=(callback,))
    worker.start()
    worker.join()
    return seen["error"]


def in_thread(fn):
    """Run fn in another thread and wait; re-raise what it raised."""
    out: dict = {}

    def target():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised below
            out["error"] = e

    worker = threading.Thread(target=target)
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]


@pytest.mark.parametrize("where", ["another thread", "the same thread (from a callback)"])
def test_a_second_call_of_a_hooked_pipeline_during_the_first_is_refused(pipes, where):
    pipe, _ = pipes
    second = (lambda: in_thread(lambda: call(pipe))) if where == "another thread" else (lambda: call(pipe))
    with apply_guidance(pipe, CFG()) as handle:
        error = overlapped(lambda cb: call(pipe, callback_on_step_end=cb), second)
        assert isinstance(error, RuntimeError) and "already running" in str(error)
        assert handle.nfe.tolist() == [6, 6]  # the first call finished guided, counted whole


def test_one_strategy_shared_by_two_pipelines_at_once_is_refused(pipes):
    a, b = pipes
    shared = APG(norm_threshold=2.0)
    with apply_guidance(a, shared), apply_guidance(b, shared):
        error = overlapped(lambda cb: call(a, callback_on_step_end=cb), lambda: in_thread(lambda: call(b)))
        assert isinstance(error, RuntimeError) and "is guiding another pipeline call right now" in str(error)
        alone = call(b)  # one after the other: each call gets the strategy's fresh state
    with apply_guidance(b, APG(norm_threshold=2.0)):
        assert torch.equal(alone, call(b))


def test_remove_from_a_step_callback_is_refused_and_the_call_stays_guided(pipes):
    pipe, _ = pipes
    with apply_guidance(pipe, CFG()) as handle:
        reference = call(pipe)
        errors = []

        def callback(p, i, t, tensors):
            try:
                handle.remove()
            except RuntimeError as e:
                errors.append(e)
            return {}

        assert torch.equal(call(pipe, callback_on_step_end=callback), reference)
        assert errors and "remove() during a guided pipeline call" in str(errors[0])
        assert handle.nfe.tolist() == [6, 6]


def test_a_removed_handle_cannot_be_reentered(pipes):
    pipe, _ = pipes
    handle = apply_guidance(pipe, CFG())
    handle.remove()
    with pytest.raises(RuntimeError, match="this handle was removed"):
        with handle:
            pass


def test_a_deepcopy_of_a_guided_pipeline_refuses_to_run_guided(pipes):
    pipe, _ = pipes
    with apply_guidance(pipe, CFG()):
        twin = copy.deepcopy(pipe)
        with pytest.raises(RuntimeError, match="copy of one guided by apply_guidance"):
            call(twin)
    assert torch.isfinite(call(pipe)).all()  # the original, unhooked, still runs


def test_set_timesteps_from_a_step_callback_is_refused(pipes):
    """Before: the call went on with the strategy's windows and schedules planned for the old timesteps."""
    pipe, _ = pipes

    def callback(p, i, t, tensors):
        if i == 1:
            p.scheduler.set_timesteps(5)
        return {}

    with apply_guidance(pipe, CFG()):
        with pytest.raises(ValueError, match=r"timesteps were replaced during the call .* at evaluation 2"):
            call(pipe, callback_on_step_end=callback)
        assert torch.isfinite(call(pipe)).all()  # the next call is fine
