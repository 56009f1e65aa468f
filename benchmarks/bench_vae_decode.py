"""What classifier-based guidance costs on a latent pipeline: the per-step VAE decode of x0.

    python benchmarks/bench_vae_decode.py [--latent-size 16] [--repeats 3] [--threads 1] [--device cuda]

EluCD decodes the x0 estimate and back-propagates through the decoder every step; GFCG decodes it
(no gradient). Timed side by side, interleaved, against the step's own work: one CFG forward
(batch 2) of a Stable Diffusion 1.5-size UNet. Random weights with SD 1.5's configs (the cost does not
depend on the values). Prints median seconds and the ratio of each to the UNet call.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_hook_overhead import SD15_UNET, timed
from diffusers import AutoencoderKL, UNet2DConditionModel

SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent-size", type=int, default=16, help="latent side (64 = 512 px)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval().to(args.device)
    vae = AutoencoderKL(**SD15_VAE).eval().to(args.device).requires_grad_(False)
    z = torch.randn(1, 4, args.latent_size, args.latent_size, device=args.device)
    text = torch.randn(2, 77, 768, device=args.device)

    def unet_cfg():
        with torch.no_grad():
            unet(torch.cat([z, z]), 500, encoder_hidden_states=text)

    def decode():
        with torch.no_grad():
            vae.decode(z)

    def decode_backward():
        x = z.clone().requires_grad_(True)
        vae.decode(x).sample.mean().backward()

    variants = {"UNet CFG forward (batch 2)": unet_cfg, "VAE decode (GFCG)": decode,
                "VAE decode + backward (EluCD)": decode_backward}
    for fn in variants.values():
        fn()  # warm-up
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, args.device))
    base = statistics.median(times["UNet CFG forward (batch 2)"])
    print(f"SD 1.5-size UNet and VAE, {args.latent_size}x{args.latent_size} latents, device={args.device}, "
          f"threads={torch.get_num_threads()}, {args.repeats} interleaved repeats")
    for name, ts in times.items():
        print(f"{name:<32} {statistics.median(ts):8.3f} s  {statistics.median(ts) / base:6.3f}x the UNet call")


if __name__ == "__main__":
    main()
