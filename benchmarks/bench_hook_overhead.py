"""Overhead of apply_guidance against the pipeline's native CFG, measured side by side in one run.

    python benchmarks/bench_hook_overhead.py [--steps 4] [--repeats 3] [--device cuda] [--dtype fp16] [--threads 1]
        [--json out.json]
    python benchmarks/bench_hook_overhead.py --suite adaptive ...   # NFE savings as wall-clock speed-up

A Stable Diffusion 1.5-size UNet (UNet2DConditionModel with SD 1.5's config, random weights,
860M parameters) on 64x64 latents (512x512 images), batch 1 with CFG, inside a real
StableDiffusionPipeline (tiny text encoder and VAE: prompt embeddings are passed directly and
output_type="latent", so only the denoising loop is timed). Variants run interleaved
(native, CFG, APG, native, ...) so that machine load affects all alike; the printed ratio is
median(variant) / median(native).

`--suite per-step` times the hook's fixed cost per denoising step on the tiny test SD pipeline (batch 2,
`--steps` steps, latent output): per-step milliseconds of native CFG, CFG and APG through the hook, and
their difference from native and ratio to it, all interleaved in one run. `--clock cpu` times this
process's CPU time instead of wall time (on a CPU with `--threads 1`: robust to other jobs on a shared
machine).

`--suite stub` replaces the UNet with a stub of its signature that costs almost nothing (a cheap function of its
input), so the per-step cost of the hook, the layout and each strategy's math shows in microseconds: native
CFG, hook CFG and hook APG on the stub, interleaved, this process's CPU time; the per-step cost is the slope
between calls of K and 2K steps, the per-call cost apart (`--steps 50 --repeats 21`).

`--suite context` times the StepContext the hook builds per step, with the scheduler's tables read once
per call (what the hook does) against once per step, side by side.

`--dtype fp16|bf16` (or float16 / bfloat16) runs the pipeline in half precision (what a GPU runs; the hook's x0
math stays float32, see guidance.parametrization); default fp32.

`--suite adaptive` times adaptive guidance and LinearAG instead. Random weights give no meaningful
cosine similarity, so AG runs with threshold -1 (every sample switches after its first step, the
largest saving: K + 1 NFE instead of 2K for K steps) and LinearAG with its unfitted default plan
(K + ceil(ceil(K / 2) / 2) NFE): the ratio shows how much of the NFE saving becomes wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_pipelines import build  # noqa: E402

from guidance import APG, CFG, AdaptiveGuidance, LinearAG  # noqa: E402
from pipelines import apply_guidance  # noqa: E402

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


class TimingLinearAG(LinearAG):
    """LinearAG without its call check: the benchmark's random negative embeddings stand in for the
    empty negative prompt the coefficients assume (only the time is measured here)."""

    def on_call(self, call) -> None:
        pass


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sd15_pipeline(device: str, dtype: torch.dtype = torch.float32):
    pipe = build("sd")
    torch.manual_seed(0)
    pipe.register_modules(unet=UNet2DConditionModel(**SD15_UNET).eval())
    return pipe.to(device, dtype)


def timed(fn, device: str) -> float:
    """Seconds of fn(), with the GPU synchronised before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed_call(pipe, steps: int, device: str, strategy=None, latent_size: int = 64) -> float:
    g = torch.Generator(device="cpu").manual_seed(0)
    embeds = torch.randn(2, 1, 77, 768, generator=g).to(device, pipe.unet.dtype)
    kwargs = dict(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], num_inference_steps=steps,
                  guidance_scale=7.5, output_type="latent", generator=g, height=8 * latent_size,
                  width=8 * latent_size)

    def call():
        if strategy is None:
            pipe(**kwargs)
        else:
            with apply_guidance(pipe, strategy):
                pipe(**kwargs)

    return timed(call, device)


def per_step(args) -> None:
    """Fixed cost of the hook per step: a tiny SD pipeline, so the denoiser itself costs little."""
    pipe = build("sd").to(args.device, DTYPES[args.dtype])
    kwargs = dict(prompt=["a photo of a cat", "a red car"], num_inference_steps=args.steps, guidance_scale=7.5,
                  output_type="latent", height=32, width=32)
    variants = {"native CFG": None, "hook CFG": CFG(), "hook APG": APG(norm_threshold=15.0, momentum=-0.5)}

    def clocked(fn) -> float:
        if args.clock == "wall":
            return timed(fn, args.device)
        start = time.process_time()  # this process's CPU time: what the hook costs, not others' load
        fn()
        return time.process_time() - start

    def call(strategy):
        g = torch.Generator().manual_seed(0)
        if strategy is None:
            return clocked(lambda: pipe(**kwargs, generator=g))
        with apply_guidance(pipe, strategy):
            return clocked(lambda: pipe(**kwargs, generator=g))

    for strategy in variants.values():
        call(strategy)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, strategy in variants.items():
            times[name].append(call(strategy) / args.steps * 1e3)
    base = statistics.median(times["native CFG"])
    print(f"tiny SD pipeline (test components), batch 2 + CFG, {args.steps} steps, {args.repeats} interleaved "
          f"repeats, device={args.device}, dtype={args.dtype}, torch threads={torch.get_num_threads()}, "
          f"clock={args.clock}")
    # The fastest repeat is the least disturbed by other load on a shared machine: report both.
    low = min(times["native CFG"])
    print(f"{'variant':<12} {'median ms/step':>15} {'+ms vs native':>14} {'ratio':>7} {'min ms/step':>12} "
          f"{'+ms vs native':>14} {'ratio':>7}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<12} {med:15.3f} {med - base:14.3f} {med / base:7.4f} {min(ts):12.3f} {min(ts) - low:14.3f} "
              f"{min(ts) / low:7.4f}")


class StubUNet(ModelMixin, ConfigMixin):
    """A near-zero-cost denoiser with UNet2DConditionModel's signature: a cheap function of its input (and of the
    prompt embeddings, so the two branches differ), so that a step's time is the pipeline loop, the scheduler and
    the guidance machinery, and the hook's fixed cost is not lost in the UNet's time noise."""

    @register_to_config
    def __init__(self, in_channels: int = 4, out_channels: int = 4, sample_size: int = 4,
                 time_cond_proj_dim: int | None = None, cross_attention_dim: int = 32):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))  # a parameter, so the model has a device and dtype

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, attention_mask=None,
                cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=True, **kwargs):
        shift = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        out = sample * self.scale + shift
        return (out,) if not return_dict else UNet2DConditionOutput(sample=out)


def stub_step_cost(args) -> None:
    """Per-step cost of the hook, its layout and each strategy's math, on a denoiser that costs ~nothing:
    native CFG, hook CFG and hook APG interleaved, this process's CPU time. Each variant runs calls of K and 2K
    steps (K = --steps): the per-step cost is the slope (T(2K) - T(K)) / K, so the per-call work (the hook's
    call checks, the pipeline's prompt handling, installing and removing the hook) is reported apart."""
    pipe = build("sd")
    pipe.register_modules(unet=StubUNet(cross_attention_dim=pipe.text_encoder.config.hidden_size))
    pipe = pipe.to(args.device)
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 2, 4, pipe.text_encoder.config.hidden_size, generator=g).to(args.device)
    kwargs = dict(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], guidance_scale=7.5,
                  output_type="latent", height=32, width=32)
    variants = {"native CFG": None, "hook CFG": CFG(), "hook APG": APG(norm_threshold=15.0, momentum=-0.5)}

    def call(strategy, steps: int) -> float:
        start = time.process_time()
        handle = None if strategy is None else apply_guidance(pipe, strategy)
        pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0))
        if handle is not None:
            handle.remove()
        return (time.process_time() - start) * 1e6

    for strategy in variants.values():
        call(strategy, args.steps)  # warm-up
    k = args.steps
    per_step: dict[str, list[float]] = {name: [] for name in variants}
    per_call: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, strategy in variants.items():
            short, long = call(strategy, k), call(strategy, 2 * k)
            per_step[name].append((long - short) / k)
            per_call[name].append(short - k * per_step[name][-1])
    base = statistics.median(per_step["native CFG"])
    base_call = statistics.median(per_call["native CFG"])
    print(f"stub denoiser (UNet signature, ~0 cost) in the tiny SD pipeline, batch 2 + CFG, calls of {k} and {2 * k} "
          f"steps, {args.repeats} interleaved repeats, device={args.device}, torch threads={torch.get_num_threads()}, "
          f"clock=process CPU time")
    print(f"{'variant':<12} {'us/step':>9} {'+us/step vs native':>19} {'ratio':>7} {'us/call':>9} "
          f"{'+us/call vs native':>19}")
    rows = []
    for name in variants:
        med, call_us = statistics.median(per_step[name]), statistics.median(per_call[name])
        rows.append({"variant": name, "us_per_step": med, "above_native_us_per_step": med - base,
                     "us_per_call": call_us, "above_native_us_per_call": call_us - base_call})
        print(f"{name:<12} {med:9.1f} {med - base:19.1f} {med / base:7.3f} {call_us:9.0f} {call_us - base_call:19.0f}")
    if args.json:
        args.json.write_text(json.dumps({"suite": "stub", "steps": [k, 2 * k], "rows": rows}, indent=2))


def context_cost(args) -> None:
    """The StepContext the hook builds at every step, with the scheduler's tables read once per call (as
    the hook does) against read at every step (a fresh table per step, as before), interleaved."""
    import timeit

    from pipelines.parametrization import build_step_context

    pipe = build("sd")
    x = torch.randn(2, 4, 4, 4)
    rows = []
    for scheduler in (pipe.scheduler, build("sdxl").scheduler):  # DDIM (discrete), Euler (sigma table)
        scheduler.set_timesteps(args.steps)
        t = scheduler.timesteps[args.steps // 2]
        per_call = {"step": 0, "scale": 7.5, "rescale": 0.0}
        variants = {"tables per call": lambda: build_step_context(scheduler, per_call, x, t),
                    "tables per step": lambda: build_step_context(scheduler, {"step": 0, "scale": 7.5,
                                                                              "rescale": 0.0}, x, t)}
        times = {k: [] for k in variants}
        for _ in range(args.repeats):
            for k, fn in variants.items():
                times[k].append(timeit.timeit(fn, number=200) / 200 * 1e3)
        per_step = statistics.median(times["tables per step"])
        for k, ts in times.items():
            rows.append((type(scheduler).__name__, k, statistics.median(ts), statistics.median(ts) / per_step))
    print(f"build_step_context, batch 2, {args.repeats} interleaved repeats of 200 calls, torch threads="
          f"{torch.get_num_threads()}")
    print(f"{'scheduler':<24} {'variant':<16} {'median ms':>10} {'ratio':>7}")
    for name, k, ms, ratio in rows:
        print(f"{name:<24} {k:<16} {ms:10.4f} {ratio:7.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--latent-size", type=int, default=64,
                   help="latent side (64 = 512 px, SD 1.5's size); smaller is cheaper on a CPU and, as the "
                        "hook's work grows linearly with it and the UNet's faster, gives a conservative ratio")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (use 1 on a shared machine: oversubscribed threads spin and distort "
                        "timings)")
    p.add_argument("--suite", choices=("overhead", "adaptive", "per-step", "stub", "context"), default="overhead")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="per-step suite: wall time, or this process's CPU time (with --threads 1 on a CPU: robust "
                        "to other jobs' load, which inflates wall time)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="pipeline precision: fp16 / bf16 as run on a GPU (CPU fp16 kernels are slow or missing)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite == "per-step":
        return per_step(args)
    if args.suite == "context":
        return context_cost(args)
    if args.suite == "stub":
        return stub_step_cost(args)
    pipe = sd15_pipeline(args.device, DTYPES[args.dtype])
    variants = {"native CFG": None, "hook CFG": CFG(), "hook APG": APG(norm_threshold=15.0, momentum=-0.5)}
    if args.suite == "adaptive":
        variants = {"native CFG": None, "AG (switch after step 1)": AdaptiveGuidance(threshold=-1.0),
                    "LinearAG (default plan)": TimingLinearAG.unfitted(args.steps)}
    timed_call(pipe, 1, args.device, latent_size=args.latent_size)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, strategy in variants.items():
            times[name].append(timed_call(pipe, args.steps, args.device, strategy, args.latent_size))
    base = statistics.median(times["native CFG"])
    rows = []
    print(f"SD1.5-size UNet, {args.latent_size}x{args.latent_size} latents, batch 1 + CFG, {args.steps} steps, "
          f"{args.repeats} interleaved repeats, "
          f"device={args.device}, dtype={args.dtype}, torch threads={torch.get_num_threads()}")
    print(f"{'variant':<26} {'median s':>9} {'ratio':>7}")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": name, "median_s": med, "ratio_to_native": med / base, "runs_s": ts})
        print(f"{name:<26} {med:9.3f} {med / base:7.4f}")
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "dtype": args.dtype, "steps": args.steps,
                                         "latent_size": args.latent_size, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
