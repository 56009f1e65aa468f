"""SkipLayerGuide: autoguidance's guide model approximated by the pipeline's own denoiser with transformer
blocks skipped during the guide evaluation only (DiT, SD3, Flux; tiny pipelines built from configs)."""

import pytest
import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.layer_skip import LayerSkipConfig, apply_layer_skip
from test_hook import count_rows
from tiny_pipelines import build, call_kwargs, denoiser

from guidance import COND, GUIDE, Autoguidance, Interval, from_config
from pipelines import SkipLayerGuide, apply_guidance, register_guide_model
from pipelines.skip_layer import SKIP_HOOK_NAME, active_skip_hooks

STEPS = 3  # call_kwargs' step count
CASES = [("dit", "transformer_blocks"), ("sd3", "transformer_blocks"), ("flux", "transformer_blocks"),
         ("flux", "single_transformer_blocks")]


@pytest.fixture(scope="module")
def pipes():
    return {name: build(name) for name in ("dit", "sd3", "flux")}


def gen():
    return torch.Generator().manual_seed(0)


def sample(pipe, name, strategy=None, guide_model=None, cfg=True):
    if strategy is None:
        return pipe(**call_kwargs(name, cfg=cfg), generator=gen()).images, None
    with apply_guidance(pipe, strategy, guide_model=guide_model) as handle:
        images = pipe(**call_kwargs(name), generator=gen()).images
    return images, handle


def prediction(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


class _Identity(torch.nn.Module):
    """A Flux block that is not there: returns its streams unchanged, in the block's order."""

    def forward(self, hidden_states, encoder_hidden_states, *args, **kwargs):
        return encoder_hidden_states, hidden_states


def skipped_by_hand(name, model, blocks, layers, args, kwargs) -> torch.Tensor:
    """The denoiser with `layers` skipped, computed without SkipLayerGuide: diffusers' own layer skip (DiT),
    SD3's own `skip_layers` argument (Stability's SLG), or the blocks swapped for identities (Flux)."""
    with torch.no_grad():
        if name == "dit":
            apply_layer_skip(model, LayerSkipConfig(list(layers), fqn=blocks))
            try:
                return prediction(model(*args, **kwargs))
            finally:
                HookRegistry.check_if_exists_or_initialize(model).remove_hook("layer_skip_hook", recurse=True)
        if name == "sd3":
            return prediction(model(*args, **kwargs, skip_layers=list(layers)))
        stack = getattr(model, blocks)
        kept = {i: stack[i] for i in layers}
        try:
            for i in layers:
                stack[i] = _Identity()
            return prediction(model(*args, **kwargs))
        finally:
            for i, block in kept.items():
                stack[i] = block


def recording(guide: SkipLayerGuide, calls: list) -> SkipLayerGuide:
    """Record the arguments and output of every guide evaluation."""
    bind = guide.bind

    def recording_bind(denoiser_, forward, pipe_name):
        run = bind(denoiser_, forward, pipe_name)

        def recorded(*args, **kwargs):
            out = run(*args, **kwargs)
            calls.append((args, kwargs, prediction(out).clone()))
            return out
        return recorded

    guide.bind = recording_bind
    return guide


@pytest.mark.parametrize("name, blocks", CASES)
def test_no_layers_skipped_is_the_conditional_model(pipes, name, blocks):
    pipe = pipes[name]
    cond, _ = sample(pipe, name, cfg=False)
    guided, handle = sample(pipe, name, Autoguidance(scale=4.0), SkipLayerGuide([], blocks))
    torch.testing.assert_close(guided, cond, atol=1e-6, rtol=0)
    assert handle.nfe.tolist() == [STEPS, STEPS] and handle.guide_nfe.tolist() == [STEPS, STEPS]


@pytest.mark.parametrize("name, blocks", CASES)
def test_the_guide_is_the_skipped_model_and_the_main_passes_are_the_full_model(pipes, name, blocks):
    pipe = pipes[name]
    model = denoiser(pipe)
    native, _ = sample(pipe, name)
    layers = [0]
    strategy, calls, seen = Autoguidance(scale=4.0), [], []
    original = strategy.combine
    strategy.combine = lambda ctx, preds: seen.append({k: v.clone() for k, v in preds.items()}) or original(ctx, preds)
    rows = count_rows(model)
    try:
        guided, handle = sample(pipe, name, strategy, recording(SkipLayerGuide(layers, blocks), calls))
    finally:
        del model.forward
    # NFE: one main row and one guide row per step and sample; the guide rows run the main model's forward
    assert handle.nfe.tolist() == [STEPS, STEPS] and handle.guide_nfe.tolist() == [STEPS, STEPS]
    assert rows["rows"] == 4 * STEPS and len(calls) == len(seen) == STEPS
    assert active_skip_hooks(model) == []
    for (args, kwargs, guide_out), preds in zip(calls, seen):
        channels = preds[COND].shape[1]  # DiT guides the first half of its learned-sigma output
        by_hand = skipped_by_hand(name, model, blocks, layers, args, kwargs)
        torch.testing.assert_close(guide_out, by_hand, atol=1e-6, rtol=0)
        torch.testing.assert_close(preds[GUIDE], by_hand[:, :channels], atol=1e-6, rtol=0)
        with torch.no_grad():
            full = prediction(model(*args, **kwargs))  # the hook's conditional rows: the full model
        torch.testing.assert_close(preds[COND], full[:, :channels], atol=1e-6, rtol=0)
        assert not torch.allclose(preds[GUIDE], preds[COND], atol=1e-4)  # the skip did change the prediction
    assert torch.isfinite(guided).all()
    assert torch.equal(sample(pipe, name)[0], native)  # removal: the pipeline as before, bit for bit


def test_mixed_with_cfg_it_is_sd3s_own_skip_layer_guidance(pipes):
    """SD3's built-in SLG, u + s (c - u) + s_slg (c - c_skip) at every step, is Autoguidance with the skip
    guide at w = s + s_slg, mix = s_slg / (w - 1) (the same three rows a step)."""
    pipe, s, s_slg = pipes["sd3"], 3.0, 2.0
    kw = call_kwargs("sd3", guidance_scale=s)
    native = pipe(**kw, generator=gen(), skip_guidance_layers=[0], skip_layer_guidance_scale=s_slg,
                  skip_layer_guidance_start=-1.0, skip_layer_guidance_stop=1.0).images  # on at every step
    strategy = Autoguidance(scale=s + s_slg, mix=s_slg / (s + s_slg - 1))
    with apply_guidance(pipe, strategy, guide_model=SkipLayerGuide([0])) as handle:
        ours = pipe(**kw, generator=gen()).images
    torch.testing.assert_close(ours, native, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, pipe(**kw, generator=gen()).images, atol=1e-3)  # not CFG alone
    assert handle.nfe.tolist() == [2 * STEPS] * 2 and handle.guide_nfe.tolist() == [STEPS] * 2


def test_diffusers_block_skip_swaps_the_sd3_streams(pipes):
    """Why SkipLayerGuide registers its own ordered subclass of diffusers' TransformerBlockSkipHook: diffusers
    0.42.1's hook returns (hidden, encoder) where SD3's JointTransformerBlock returns (encoder, hidden). If this
    test fails, diffusers has fixed it and `_OrderedBlockSkipHook` can go."""
    pipe, calls = pipes["sd3"], []
    sample(pipe, "sd3", Autoguidance(), recording(SkipLayerGuide([0]), calls))
    args, kwargs, ours = calls[0]
    model = denoiser(pipe)
    apply_layer_skip(model, LayerSkipConfig([0], fqn="transformer_blocks"))
    try:
        with pytest.raises(RuntimeError, match="is invalid for input of size"), torch.no_grad():
            model(*args, **kwargs)
    finally:
        HookRegistry.check_if_exists_or_initialize(model).remove_hook("layer_skip_hook", recurse=True)
    torch.testing.assert_close(ours, skipped_by_hand("sd3", model, "transformer_blocks", [0], args, kwargs),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["dit", "sd3", "flux"])
def test_an_exception_in_the_guide_leaves_no_skip_hook(pipes, name):
    pipe = pipes[name]
    model = denoiser(pipe)
    native, _ = sample(pipe, name)
    block = model.transformer_blocks[0]

    def fail_while_skipped(module, args):
        if module._diffusers_hook.get_hook(SKIP_HOOK_NAME) is not None:
            raise RuntimeError("boom in the guide evaluation")

    pre = block.register_forward_pre_hook(fail_while_skipped)
    try:
        with pytest.raises(RuntimeError, match="boom in the guide evaluation"):
            sample(pipe, name, Autoguidance(), SkipLayerGuide([0]))
    finally:
        pre.remove()
    assert active_skip_hooks(model) == []
    assert torch.equal(sample(pipe, name)[0], native)


def test_named_guide_round_trips_and_equals_the_object(pipes):
    pipe = pipes["dit"]
    strategy = from_config(Autoguidance(scale=3.0, guide_model="skip-layers:1").to_config())
    assert strategy.guide_model == "skip-layers:1"
    by_name, handle = sample(pipe, "dit", strategy)
    by_object, _ = sample(pipe, "dit", Autoguidance(scale=3.0), SkipLayerGuide([1]))
    assert torch.equal(by_name, by_object) and handle.guide_nfe.tolist() == [STEPS, STEPS]
    calls = []
    _, handle = sample(pipe, "dit", Interval(Autoguidance(scale=3.0), start=0.5), recording(SkipLayerGuide([1]), calls))
    assert handle.guide_nfe.tolist() == [2, 2] and len(calls) == 2  # steps 1 and 2 of 3 only
    guide = SkipLayerGuide.from_name("skip-layers:single_transformer_blocks:0,2")
    assert (guide.layers, guide.blocks) == ([0, 2], "single_transformer_blocks")
    assert SkipLayerGuide.from_name("skip-layers:").layers == []


def test_bad_layers_blocks_and_families_are_refused(pipes):
    dit, sd3, flux = pipes["dit"], pipes["sd3"], pipes["flux"]
    cases = [
        (dit, SkipLayerGuide([1, 5]), r"layers=\[5\] out of range for DiTTransformer2DModel.transformer_blocks; "
                                      r"allowed: indices 0..1 \(2 blocks\)"),
        (flux, SkipLayerGuide([1], "single_transformer_blocks"),
         r"layers=\[1\] out of range for FluxTransformer2DModel.single_transformer_blocks; allowed: indices 0..0"),
        (sd3, SkipLayerGuide([0], "single_transformer_blocks"),
         r"blocks='single_transformer_blocks' is not a block stack of SD3Transformer2DModel; "
         r"allowed: 'transformer_blocks'"),
        (build("sd"), SkipLayerGuide([0]),
         r"StableDiffusionPipeline's denoiser is a UNet2DConditionModel; "
         r"allowed: DiTTransformer2DModel, .*SD3Transformer2DModel, FluxTransformer2DModel"),
    ]
    for pipe, guide, message in cases:
        with pytest.raises(ValueError, match=message):
            apply_guidance(pipe, Autoguidance(), guide_model=guide)
    with pytest.raises(ValueError, match=r"layers=\[9\] out of range"):
        apply_guidance(dit, Autoguidance(guide_model="skip-layers:9"))
    for layers, message in ((-1, r"layers=-1; allowed: a list of block indices"),
                            ([-1], r"layers=\[-1\]; allowed"), ("7", r"layers='7'; allowed"),
                            ([True], r"layers=\[True\]; allowed"), ([1, 1], r"layers=\[1, 1\] repeats an index")):
        with pytest.raises(ValueError, match=message):
            SkipLayerGuide(layers)
    for name in ("skip-layers:a,b", "skip-layers:7,,8"):
        with pytest.raises(ValueError, match=rf"guide_model='{name}'; allowed: 'skip-layers:<i>,<j>,...'"):
            SkipLayerGuide.from_name(name)
    with pytest.raises(ValueError, match=r"name='skip-layers:x'; allowed: a name not starting with 'skip-layers:'"):
        register_guide_model("skip-layers:x", lambda: None)
    assert active_skip_hooks(denoiser(dit)) == []  # refused before anything was installed
