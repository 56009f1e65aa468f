"""Side-by-side timings of evaluation/ against torchmetrics (and scipy), on the same inputs in one run.

1. Frechet distance on 2048-d float64 statistics: ours (symmetric eigvalsh with the reference's Cholesky factor,
   on the first call, which computes the factor, and with it cached) vs torchmetrics'
   FrechetInceptionDistance.compute (eigvals of the product) vs scipy sqrtm, all from
   the same accumulated sums; prints the values and the speed ratios.
2. Feature extraction: our InceptionFeatures + float64 moments vs torchmetrics' FrechetInceptionDistance.update
   (same TF-resize, antialias=False, and the same weights converted from the local TorchScript file).

    python benchmarks/bench_metrics.py                  # CPU (1 thread by default) and CUDA when present
    python benchmarks/bench_metrics.py --images 256 --batch 64 --threads 16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's evaluation/, also when run as a script
from evaluation import (FeatureMetrics, FeatureMoments, InceptionFeatures, ReferenceStats,  # noqa: E402
                        torchscript_to_fidelity_state_dict)


class Identity(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def best_of(fn, device: torch.device, repeats: int):
    """Fastest of ``repeats`` runs: the CPU is shared with other jobs."""
    runs = [timed(fn, device) for _ in range(repeats)]
    return runs[0][0], min(seconds for _, seconds in runs)


def random_sums(d: int, n: int, seed: int, device: torch.device, shift: float) -> tuple[torch.Tensor, ...]:
    """Feature sums of n correlated, non-negative-ish features (like pool3), as both libraries accumulate them."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix).abs() + shift
    return x.sum(0).to(device), (x.T @ x).to(device), torch.tensor(n, device=device)


def bench_frechet(device: torch.device, d: int, n: int, run_scipy: bool,
                  repeats: int) -> list[tuple[str, float, float]]:
    real, fake = random_sums(d, n, 0, device, 0.0), random_sums(d, n, 1, device, 0.05)
    tm = FrechetInceptionDistance(feature=Identity(d)).to(device)
    tm.real_features_sum, tm.real_features_cov_sum, tm.real_features_num_samples = real
    tm.fake_features_sum, tm.fake_features_cov_sum, tm.fake_features_num_samples = fake
    tm.orig_dtype = torch.float64

    mu_r, sigma_r = moments_from(real, d, device)
    reference = ReferenceStats(mu_r, sigma_r, n, "legacy_tf", "synthetic")

    def ours() -> float:  # the unwrapped compute: no torchmetrics result cache between repeats
        return FeatureMetrics.compute(metric)["fid"]

    metric = FeatureMetrics(reference).to(device)
    metric.feature_sum, metric.outer_sum, metric.num_samples = fake
    rows = []
    value, first = timed(ours, device)  # includes the factor of sigma_ref, then cached in `reference`
    rows.append(("ours, first call (+ reference factor)", value, first))
    value, cached = best_of(ours, device, repeats)
    rows.append(("ours, reference factor cached", value, cached))
    tm_value, tm_time = best_of(lambda: float(FrechetInceptionDistance.compute(tm)), device, repeats)
    rows.append(("torchmetrics FID.compute (eigvals)", tm_value, tm_time))
    if run_scipy:
        mu_f, sigma_f = (t.cpu().numpy() for t in moments_from(fake, d, device))
        mu_r_np, sigma_r_np = mu_r.cpu().numpy(), sigma_r.cpu().numpy()

        def scipy_fd():
            covmean = scipy.linalg.sqrtm(sigma_r_np @ sigma_f).real
            return float(((mu_r_np - mu_f) ** 2).sum() + np.trace(sigma_r_np) + np.trace(sigma_f)
                         - 2 * np.trace(covmean))

        sp_value, sp_time = timed(scipy_fd, device)
        rows.append(("scipy sqrtm (pytorch-fid / clean-fid)", sp_value, sp_time))
    return rows


def moments_from(sums, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    moments = FeatureMoments(d).to(device)
    moments.feature_sum, moments.outer_sum, moments.num_samples = sums
    return moments.moments()


def bench_extraction(device: torch.device, weights: Path, images: int, batch: int, size: int):
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (images, 3, size, size), generator=g, dtype=torch.uint8)
    ours_net = InceptionFeatures(preset="legacy_tf", device=device)
    ours = FeatureMetrics(ReferenceStats(torch.zeros(2048, dtype=torch.float64), torch.eye(2048, dtype=torch.float64),
                                         2, "legacy_tf", "x")).to(device)
    tm = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights), antialias=False).to(device)
    batches = [b.to(device) for b in data.split(batch)]
    ours.update(ours_net(batches[0][:2]))  # warm-up (cuDNN autotuning, allocator)
    tm.update(batches[0][:2], real=False)

    def run_ours():
        for b in batches:
            ours.update(ours_net(b))

    def run_tm():
        for b in batches:
            tm.update(b, real=False)

    _, t_ours = timed(run_ours, device)
    _, t_tm = timed(run_tm, device)
    with torch.no_grad():
        diff = (ours_net(batches[0]) - tm.inception(batches[0]).float()).abs().max().item()
    return images / t_ours, images / t_tm, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: other jobs share the CPU)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=4096, help="samples behind each covariance")
    parser.add_argument("--images", type=int, default=None, help="images for extraction (CPU 16, CUDA 1024)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (CPU 8, CUDA 128)")
    parser.add_argument("--size", type=int, default=32, help="image side before the resize to 299")
    parser.add_argument("--repeats", type=int, default=3, help="best-of repeats for the Frechet timings")
    parser.add_argument("--no-scipy", action="store_true", help="skip scipy sqrtm (slowest)")
    parser.add_argument("--devices", nargs="*", default=None, help="default: cpu, and cuda when available")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights-inception-converted.pth"
        torch.save(torchscript_to_fidelity_state_dict(), weights)
        for name in devices:
            device = torch.device(name)
            label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} thread(s)"
            print(f"\n== {label} ==")
            rows = bench_frechet(device, args.dim, args.samples, not args.no_scipy and name == "cpu", args.repeats)
            ref_value, ref_time = rows[2][1], rows[2][2]
            print(f"Frechet distance, d={args.dim}, float64 (ratio = torchmetrics time / this time)")
            print(f"  {'method':40s} {'value':>16s} {'rel. diff':>10s} {'time s':>8s} {'ratio':>7s}")
            for method, value, seconds in rows:
                rel = abs(value - ref_value) / abs(ref_value)
                print(f"  {method:40s} {value:16.8f} {rel:10.1e} {seconds:8.3f} {ref_time / seconds:7.2f}")
            images = args.images or (1024 if device.type == "cuda" else 16)
            batch = args.batch or (128 if device.type == "cuda" else 8)
            ours_ips, tm_ips, diff = bench_extraction(device, weights, images, batch, args.size)
            print(f"Feature extraction + float64 moments, {images} images {args.size}px -> 299, batch {batch}")
            print(f"  {'ours (InceptionFeatures + FeatureMetrics)':40s} {ours_ips:10.1f} img/s")
            print(f"  {'torchmetrics FID.update (antialias=False)':40s} {tm_ips:10.1f} img/s")
            print(f"  ratio ours / torchmetrics {ours_ips / tm_ips:.2f}; max |feature diff| {diff:.1e}")


if __name__ == "__main__":
    main()
