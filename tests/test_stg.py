"""Spatiotemporal skip guidance (STG, Hyung et al. 2024, arXiv 2411.18664): `SLG`'s rule, u + w (c - u) + s (c - p),
with whole blocks of a video transformer skipped in the perturbed pass, on the video pipelines (and the image
transformers whose block stacks are known), against an independent reference: the same pipeline whose denoiser
forward adds (s / w) (c - p) to its conditional rows, p from a copy of the denoiser with the blocks deleted from
its block list (no hooks), so that the pipeline's own CFG, u + w (c' - u), makes the same rule."""

import pytest
import torch

from pipeline_zoo import build, call_kwargs

from guidance import SLG, Interval
from pipelines import apply_guidance

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread_per_module")]

W, S = 3.0, 2.0  # the call's CFG scale and STG's scale
# Qwen-Image is left out: it rescales its CFG result to the conditional prediction's norm, which the reference's
# c' would change (the hook rescales to the norm of c, the pipeline's own conditional prediction).
# class -> (block stack, whether its two branches come as one [uncond; cond] batch or as two calls, cond first)
CASES = {"WanPipeline": ("blocks", "sequential"),
         "LTXPipeline": ("transformer_blocks", "batched"),
         "CogVideoXPipeline": ("transformer_blocks", "batched"),
         "MochiPipeline": ("transformer_blocks", "batched"),
         "HunyuanVideoPipeline": ("single_transformer_blocks", "sequential"),
         "CogView4Pipeline": ("transformer_blocks", "sequential")}


def run(pipe, kwargs) -> torch.Tensor:
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def without_block(denoiser: torch.nn.Module, stack: str, index: int) -> torch.nn.Module:
    """A fresh denoiser of the same config and weights with block `index` of `stack` deleted (its forward iterates
    the list). Built anew, not deep-copied: a copy would keep the hook registry of the shared zoo component, whose
    forward wrapper still calls the original module."""
    skipped = type(denoiser).from_config(denoiser.config).eval()
    skipped.load_state_dict(denoiser.state_dict())
    blocks = getattr(skipped, stack)
    setattr(skipped, stack, torch.nn.ModuleList([b for i, b in enumerate(blocks) if i != index]))
    return skipped


def reference_forward(denoiser: torch.nn.Module, stack: str, layout: str):
    """The denoiser's forward with (S / W) (c - p) added to its conditional rows."""
    forward, skipped, calls = denoiser.forward, without_block(denoiser, stack, 0), [0]

    def patched(*args, **kwargs):
        out = forward(*args, **kwargs)
        tensor = out[0] if isinstance(out, tuple) else out.sample
        calls[0] += 1
        if layout == "sequential" and calls[0] % 2 == 0:  # the unconditional call
            return out
        p = skipped(*args, **kwargs)
        p = p[0] if isinstance(p, tuple) else p.sample
        rows = slice(tensor.shape[0] // 2, None) if layout == "batched" else slice(None)
        tensor = tensor.clone()
        tensor[rows] += S / W * (tensor[rows] - p[rows])
        return (tensor,)
    return patched


def call(name: str) -> dict:
    kwargs = call_kwargs(name)
    scale_kw = "true_cfg_scale" if "true_cfg_scale" in kwargs else "guidance_scale"
    return {**kwargs, scale_kw: W}


@pytest.mark.parametrize("name", sorted(CASES))
def test_stg_skips_the_blocks_of_the_conditional_pass_only(name):
    stack, layout = CASES[name]
    kwargs = call(name)
    pipe = build(name)
    plain = run(pipe, kwargs)
    with apply_guidance(pipe, SLG(slg_scale=S, layers=[0], blocks=stack, slg_start=0.0, slg_stop=1.0)) as handle:
        ours = run(pipe, kwargs)
    assert rel(ours, plain) > 1e-4, "the skipped block changes the output here"
    steps = int(handle.nfe[0]) // 2
    assert handle.perturbed_nfe.tolist() == [steps] * ours.shape[0]
    assert torch.equal(run(pipe, kwargs), plain), "removal leaves no skip hook behind"
    reference = build(name)
    reference.transformer.forward = reference_forward(reference.transformer, stack, layout)
    try:
        assert rel(ours, run(reference, kwargs)) <= 1e-5
    finally:
        del reference.transformer.forward  # the zoo shares its components between tests


def test_stg_window_skips_the_perturbed_rows_outside_it():
    pipe = build("WanPipeline")
    kwargs = call("WanPipeline")
    with apply_guidance(pipe, Interval(SLG(slg_scale=S, layers=[0], slg_start=0.0, slg_stop=1.0), 0.0, 0.4)) as h:
        run(pipe, kwargs)
    assert h.perturbed_nfe.tolist() == [1, 1] and h.nfe.tolist() == [4, 4]  # 3 steps, one inside the window


def test_a_stack_the_denoiser_does_not_have_is_refused_by_name():
    with pytest.raises(ValueError, match=r"blocks='transformer_blocks' is not a block stack of WanTransformer3DModel; "
                                         r"allowed: 'blocks'"):
        run_pipe = build("WanPipeline")
        with apply_guidance(run_pipe, SLG(layers=[0], blocks="transformer_blocks")):
            run(run_pipe, call("WanPipeline"))
