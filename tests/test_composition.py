"""The guidance hook composes with what users stack on a pipeline (issue #14, build item 5).

For each: CFG through the hook equals the native pipeline under the same composition (relative error
<= 1e-5; measured 0.0), APG(eta=1, r=0, beta=0) equals it too (<= 1e-5; measured <= 5.4e-7), and
removing the hook gives back the composed pipeline's output bit for bit.

- `torch.compile` of the whole UNet, with the "eager" backend: dynamo traces the pipeline, the hook and
  the UNet, so this is where the hook could break a compiled graph. Inductor works on this machine but
  its C++ compilation is too slow for a test (191 s for the first compiled call, about 150 s more per new
  hook); `benchmarks/check_compile.py` runs the same check with inductor (measured: CFG 0.0, APG 5.7e-7,
  removal bit-identical). What the hook adds is dynamo's tracing, the same for every backend.
- group offloading (`enable_group_offload`, block and leaf level) with onload device = CPU;
- diffusers' cache hooks FasterCache and PyramidAttentionBroadcast (`enable_cache`) on CogVideoX, a
  batched [uncond; cond] transformer (FirstBlockCache on Flux is in test_layouts.py). A strategy that
  evaluates only some branches would change the batch these caches rely on, so it is refused (tested);
- LoRA (a tiny LoRA made with peft, loaded through the pipeline's own `load_lora_weights`);
- IP-Adapter (a tiny random adapter loaded through `load_ip_adapter`, called with precomputed
  `ip_adapter_image_embeds`: the image encoder never reaches the denoiser, so none is built).

Not testable on the CPU: model CPU offload (`enable_model_cpu_offload` and sequential offload move
modules to an accelerator and back), group offloading with CUDA streams (`use_stream=True`), and
inductor/CUDA-graph compilation; `benchmarks/gpu.sh` is the place for those.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.hooks import FasterCacheConfig, PyramidAttentionBroadcastConfig

import pipeline_zoo as zoo
import tiny_pipelines as tp
from guidance import APG, CFG, Interval
from pipelines import apply_guidance

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                        "ignore::UserWarning")
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(pipe, kwargs) -> torch.Tensor:
    torch.manual_seed(0)
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def check_exact(pipe, kwargs, strategies=(CFG(), APG(eta=1.0, norm_threshold=0.0, momentum=0.0))) -> torch.Tensor:
    """Each strategy through the hook equals the pipeline's native CFG as composed; removal is bit-identical."""
    native = run(pipe, kwargs)
    for strategy in strategies:
        with apply_guidance(pipe, strategy):
            guided = run(pipe, kwargs)
        assert relative_error(guided, native) <= TOL, type(strategy).__name__
    assert torch.equal(run(pipe, kwargs), native)
    return native


@pytest.fixture()
def sd():
    return tp.build("sd"), tp.call_kwargs("sd")


def test_torch_compile(sd):
    pipe, kwargs = sd
    plain = run(pipe, kwargs)
    torch._dynamo.reset()
    pipe.unet.compile(backend="eager")
    try:
        native = check_exact(pipe, kwargs, strategies=(CFG(),))  # each new handle retraces: one strategy here
        assert relative_error(native, plain) <= TOL
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading(sd, offload_type):
    pipe, kwargs = sd
    plain = run(pipe, kwargs)
    pipe.unet.enable_group_offload(onload_device=torch.device("cpu"), offload_type=offload_type,
                                   num_blocks_per_group=1 if offload_type == "block_level" else None)
    native = check_exact(pipe, kwargs)
    assert torch.equal(native, plain)  # CPU -> CPU offloading changes nothing


CACHES = {
    "faster_cache": lambda pipe: FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
        unconditional_batch_skip_range=2, attention_weight_callback=lambda _: 0.5,
        current_timestep_callback=lambda: pipe.current_timestep, is_guidance_distilled=False),
    "pyramid_attention_broadcast": lambda pipe: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
        current_timestep_callback=lambda: pipe.current_timestep),
}


@pytest.mark.parametrize("cache", sorted(CACHES))
def test_cache_hooks(cache):
    name = "CogVideoXPipeline"
    pipe, kwargs = zoo.build(name), {**zoo.call_kwargs(name), "num_inference_steps": 6}
    plain = run(pipe, kwargs)
    pipe.transformer.enable_cache(CACHES[cache](pipe))
    try:
        native = check_exact(pipe, kwargs)
        assert not torch.equal(native, plain)  # the cache did skip work
        with apply_guidance(pipe, Interval(CFG(), start=0.5)):
            with pytest.raises(NotImplementedError, match=r"evaluates only some branches.*disable_cache"):
                run(pipe, kwargs)
    finally:
        pipe.transformer.disable_cache()
    assert torch.equal(run(pipe, kwargs), plain)


def test_lora(sd):
    peft = pytest.importorskip("peft", reason="peft is not installed (diffusers' LoRA loaders need it; it is in "
                                              "the test extras)")
    from diffusers.utils import convert_state_dict_to_diffusers

    pipe, kwargs = sd
    plain = run(pipe, kwargs)
    donor = copy.deepcopy(pipe.unet)  # a tiny LoRA with non-zero B, made with peft, saved in diffusers' format
    donor.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in donor.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    state = convert_state_dict_to_diffusers(peft.utils.get_peft_model_state_dict(donor))
    pipe.load_lora_weights({f"unet.{k}": v for k, v in state.items()}, adapter_name="tiny")
    native = check_exact(pipe, kwargs)
    assert relative_error(native, plain) > 1e-2  # the LoRA is active
    pipe.unload_lora_weights()
    assert torch.equal(run(pipe, kwargs), plain)


def _tiny_ip_adapter(unet, image_dim: int, seed: int = 3) -> dict:
    """A random IP-Adapter state dict (image projection to 4 tokens, to_k_ip / to_v_ip per cross-attention)."""
    c, g = unet.config, torch.Generator().manual_seed(seed)
    d = c.cross_attention_dim
    image_proj = {"proj.weight": torch.randn(4 * d, image_dim, generator=g) * 0.3, "proj.bias": torch.zeros(4 * d),
                  "norm.weight": torch.ones(d), "norm.bias": torch.zeros(d)}
    ip_adapter, key = {}, 1
    for name in unet.attn_processors:  # the loader numbers the cross-attention processors 1, 3, 5, ...
        if not name.endswith("attn2.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = c.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(c.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = c.block_out_channels[int(name[len("down_blocks.")])]
        ip_adapter[f"{key}.to_k_ip.weight"] = torch.randn(hidden, d, generator=g) * 0.3
        ip_adapter[f"{key}.to_v_ip.weight"] = torch.randn(hidden, d, generator=g) * 0.3
        key += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def test_ip_adapter(sd):
    pipe, kwargs = sd
    plain = run(pipe, kwargs)
    image_dim, batch = 16, len(kwargs["prompt"])
    pipe.load_ip_adapter(_tiny_ip_adapter(pipe.unet, image_dim), subfolder="", weight_name="",
                         image_encoder_folder=None)
    g = torch.Generator().manual_seed(4)
    # With CFG on, the pipeline takes each adapter's embeddings as [negative; positive].
    embeds = torch.cat([torch.zeros(batch, 1, image_dim), torch.randn(batch, 1, image_dim, generator=g)])
    kwargs = {**kwargs, "ip_adapter_image_embeds": [embeds]}
    native = check_exact(pipe, kwargs)
    assert relative_error(native, plain) > 1e-2  # the adapter is active
    pipe.unload_ip_adapter()
    assert torch.equal(run(pipe, {k: v for k, v in kwargs.items() if k != "ip_adapter_image_embeds"}), plain)
