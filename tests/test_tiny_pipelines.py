"""Checks for the tiny test pipelines in ``tiny_pipelines.py`` (offline, CPU, a few seconds in all)."""

import os
import socket
import time

import pytest
import torch

import tiny_pipelines as tp

pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # numpy's scheduler warnings: pyproject.toml

NAMES = tp.PIPELINE_NAMES
PROMPT_NAMES = [n for n in NAMES if tp.SUPPORTS_NUM_IMAGES_PER_PROMPT[n]]


def _run(pipe, **kwargs):
    torch.manual_seed(0)  # DiTPipeline does not pass `generator` to scheduler.step (matters for DDPM / ancestral)
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images


@pytest.fixture(scope="module")
def pipes():
    return {name: tp.build(name) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_build_call_deterministic(name, pipes):
    # CPU time of this process (single-threaded), so other load on the machine does not make this flaky.
    t0 = time.process_time()
    pipe = tp.build(name)
    build_s = time.process_time() - t0
    t0 = time.process_time()
    a = _run(pipe, **tp.call_kwargs(name))
    call_s = time.process_time() - t0
    b = _run(pipes[name], **tp.call_kwargs(name))
    size = tp.IMAGE_SIZE[name]
    assert isinstance(a, torch.Tensor) and a.dtype == torch.float32
    assert a.shape == (2, 3, size, size)
    assert torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1 and a.std() > 0
    assert torch.equal(a, b), "two builds with the same seed must give bit-identical images"
    assert torch.equal(a, _run(pipe, **tp.call_kwargs(name))), "repeated call must be identical"
    assert build_s < 1.0 and call_s < 2.0, (build_s, call_s)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            assert not module.training
            assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in module.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_seed_and_global_rng(name):
    state = torch.get_rng_state()
    pipe = tp.build(name)
    assert torch.equal(state, torch.get_rng_state()), "build() must not disturb the global RNG"
    other = tp.build(name, seed=1)
    p0 = next(tp.denoiser(pipe).parameters())
    p1 = next(tp.denoiser(other).parameters())
    assert not torch.equal(p0, p1)


@pytest.mark.parametrize("name", NAMES)
def test_cfg_changes_images(name, pipes):
    on = tp.call_kwargs(name)
    off = tp.call_kwargs(name, cfg=False)
    assert on[tp.CFG_KWARG[name]] > 1 and off[tp.CFG_KWARG[name]] == 1
    assert not torch.equal(_run(pipes[name], **on), _run(pipes[name], **off))


@pytest.mark.parametrize("name", PROMPT_NAMES)
def test_num_images_per_prompt_and_negative_prompt(name, pipes):
    pipe = pipes[name]
    images = _run(pipe, **tp.call_kwargs(name, num_images_per_prompt=2, negative_prompt=True))
    assert images.shape[0] == 4 and torch.isfinite(images).all()
    with_neg = _run(pipe, **tp.call_kwargs(name, negative_prompt=True))
    assert with_neg.shape[0] == 2
    assert not torch.equal(with_neg, _run(pipe, **tp.call_kwargs(name)))


def test_dit_has_no_prompt_options():
    with pytest.raises(ValueError):
        tp.call_kwargs("dit", negative_prompt=True)
    with pytest.raises(ValueError):
        tp.call_kwargs("dit", num_images_per_prompt=2)


@pytest.mark.parametrize("name", NAMES)
def test_cfg_batch_layout(name, pipes):
    """The denoiser sees [uncond; cond] (SD, SDXL, SD3, PixArt), [cond; uncond] (DiT), or two calls (Flux)."""
    key = "class_labels" if name == "dit" else "encoder_hidden_states"
    seen = []
    den = tp.denoiser(pipes[name])
    handle = den.register_forward_pre_hook(lambda m, a, kw: seen.append(kw[key].clone()), with_kwargs=True)
    try:
        _run(pipes[name], **tp.call_kwargs(name, cfg=False))
        n_off = len(seen)
        _run(pipes[name], **tp.call_kwargs(name))
    finally:
        handle.remove()
    cond, cfg_calls = seen[0], seen[n_off:]
    layout = tp.CFG_LAYOUT[name]
    if layout == "sequential":
        assert len(cfg_calls) == 2 * n_off
        assert torch.equal(cfg_calls[0], cond) and not torch.equal(cfg_calls[1], cond)
    else:
        assert len(cfg_calls) == n_off and cfg_calls[0].shape[0] == 2 * cond.shape[0]
        first, second = cfg_calls[0].chunk(2)
        assert torch.equal(second if layout == "uncond_cond" else first, cond)
        assert not torch.equal(first if layout == "uncond_cond" else second, cond)


def test_flux_cache_context():
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.hooks.hooks import BaseState, StateManager

    class _State(BaseState):
        def reset(self, *args, **kwargs):
            pass

    class _Recorder(ModelHook):
        _is_stateful = True

        def __init__(self):
            super().__init__()
            self.state_manager = StateManager(_State)
            self.names = []

        def pre_forward(self, module, *args, **kwargs):
            self.names.append(self.state_manager.context.name)
            return args, kwargs

        def reset_state(self, module):
            self.state_manager.reset()
            return module

    pipe = tp.build("flux")
    recorder = _Recorder()
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).register_hook(recorder, "recorder")
    _run(pipe, **tp.call_kwargs("flux"))
    assert recorder.names == ["cond", "uncond"] * 3


@pytest.mark.parametrize("scheduler", tp.VP_SCHEDULERS)
@pytest.mark.parametrize("name", tp.VP_PIPELINES)
def test_scheduler_swap(name, scheduler):
    pipe = tp.build(name, scheduler)
    assert type(pipe.scheduler).__name__ == scheduler
    a = _run(pipe, **tp.call_kwargs(name))
    assert torch.isfinite(a).all()
    assert torch.equal(a, _run(tp.build(name, scheduler), **tp.call_kwargs(name)))


@pytest.mark.parametrize("name", tp.FLOW_PIPELINES)
def test_flow_pipelines_reject_vp_schedulers(name):
    with pytest.raises(ValueError):
        tp.build(name, "DDIMScheduler")
    assert type(tp.build(name, "FlowMatchEulerDiscreteScheduler").scheduler).__name__ == (
        "FlowMatchEulerDiscreteScheduler"
    )


def test_sd_v_prediction():
    pipe = tp.build_sd("v_prediction")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    swapped = tp.build_sd("v_prediction", scheduler="EulerDiscreteScheduler")
    assert type(swapped.scheduler).__name__ == "EulerDiscreteScheduler"
    assert swapped.scheduler.config.prediction_type == "v_prediction"
    images = _run(pipe, **tp.call_kwargs("sd"))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_no_network(monkeypatch):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"

    def _blocked(*args, **kwargs):
        raise AssertionError("tiny pipelines must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", _blocked)
    monkeypatch.setattr(socket.socket, "connect_ex", _blocked)
    monkeypatch.setattr(socket, "create_connection", _blocked)
    monkeypatch.setattr(socket, "getaddrinfo", _blocked)
    for name in NAMES:
        _run(tp.build(name), **tp.call_kwargs(name, batch_size=1))
