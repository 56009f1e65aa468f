"""Overhead of apply_guidance against the pipeline's native CFG, measured side by side in one run.

    python benchmarks/bench_hook_overhead.py [--steps 4] [--repeats 3] [--device cuda] [--threads 1] [--json out.json]
    python benchmarks/bench_hook_overhead.py --suite adaptive ...   # NFE savings as wall-clock speed-up

A Stable Diffusion 1.5-size UNet (UNet2DConditionModel with SD 1.5's config, random weights,
860M parameters) on 64x64 latents (512x512 images), batch 1 with CFG, inside a real
StableDiffusionPipeline (tiny text encoder and VAE: prompt embeddings are passed directly and
output_type="latent", so only the denoising loop is timed). Variants run interleaved
(native, CFG, APG, native, ...) so that machine load affects all alike; the printed ratio is
median(variant) / median(native).

`--suite per-step` times the hook's fixed cost per denoising step on the tiny test SD pipeline (batch 2,
`--steps` steps, latent output): per-step milliseconds of native CFG, CFG and APG through the hook, and
their difference from native, all interleaved in one run.

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
from diffusers import UNet2DConditionModel

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


def sd15_pipeline(device: str):
    pipe = build("sd")
    torch.manual_seed(0)
    pipe.register_modules(unet=UNet2DConditionModel(**SD15_UNET).eval())
    return pipe.to(device)


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
    embeds = torch.randn(2, 1, 77, 768, generator=g).to(device)
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
    pipe = build("sd")
    kwargs = dict(prompt=["a photo of a cat", "a red car"], num_inference_steps=args.steps, guidance_scale=7.5,
                  output_type="latent", height=32, width=32)
    variants = {"native CFG": None, "hook CFG": CFG(), "hook APG": APG(norm_threshold=15.0, momentum=-0.5)}

    def call(strategy):
        g = torch.Generator().manual_seed(0)
        if strategy is None:
            return timed(lambda: pipe(**kwargs, generator=g), "cpu")
        with apply_guidance(pipe, strategy):
            return timed(lambda: pipe(**kwargs, generator=g), "cpu")

    for strategy in variants.values():
        call(strategy)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, strategy in variants.items():
            times[name].append(call(strategy) / args.steps * 1e3)
    base = statistics.median(times["native CFG"])
    print(f"tiny SD pipeline (test components), batch 2 + CFG, {args.steps} steps, {args.repeats} interleaved "
          f"repeats, CPU, torch threads={torch.get_num_threads()}")
    # The fastest repeat is the least disturbed by other load on a shared machine: report both.
    low = min(times["native CFG"])
    print(f"{'variant':<12} {'median ms/step':>15} {'+ms vs native':>14} {'min ms/step':>12} {'+ms vs native':>14}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<12} {med:15.3f} {med - base:14.3f} {min(ts):12.3f} {min(ts) - low:14.3f}")


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
                   help="torch CPU threads (use 1 on a shared machine: oversubscribed threads spin and distort timings)")
    p.add_argument("--suite", choices=("overhead", "adaptive", "per-step"), default="overhead")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite == "per-step":
        return per_step(args)
    pipe = sd15_pipeline(args.device)
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
    print(f"SD1.5-size UNet, {args.latent_size}x{args.latent_size} latents, batch 1 + CFG, {args.steps} steps, {args.repeats} interleaved repeats, "
          f"device={args.device}, torch threads={torch.get_num_threads()}")
    print(f"{'variant':<26} {'median s':>9} {'ratio':>7}")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": name, "median_s": med, "ratio_to_native": med / base, "runs_s": ts})
        print(f"{name:<26} {med:9.3f} {med / base:7.4f}")
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "steps": args.steps,
                                         "latent_size": args.latent_size, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
