"""Device-sensitive checks on the embedded model: what can differ between the CPU and a GPU.

    python benchmarks/gpu_checks.py --device cuda          # on a GPU (benchmarks/gpu.sh runs it)
    python benchmarks/gpu_checks.py --device cpu --smoke   # the same checks, tiny, on the CPU

The unit tests run on the CPU only; these are the properties whose GPU path is different code:
per-image generators on the device, the hook's sub-batches (AG), Dynamic CFG's save / restore of
device generator states, the embedded denoiser against a CPU run, Inception features and FID on
the device against the CPU (TF32 must stay off).
Prints one line per check with its measured number; exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages

from evaluation import InceptionFeatures  # noqa: E402
from evaluation.runner import image_seed  # noqa: E402
from guidance import CFG, AdaptiveGuidance, DynamicCFG  # noqa: E402
from pipelines import apply_guidance, load_embedded  # noqa: E402


def images(pipe, device: str, indices, steps: int, scale: float = 3.0, eta: float = 0.0, strategy=None):
    """uint8-range float images for these image indices, one generator per image (as the runner does)."""
    gens = [torch.Generator(device=device).manual_seed(image_seed(0, i)) for i in indices]
    kwargs = dict(class_labels=[i % 10 for i in indices], guidance_scale=scale, num_inference_steps=steps,
                  generator=gens, eta=eta, output_type="pt")
    if strategy is None:
        return pipe(**kwargs).images, None
    with apply_guidance(pipe, strategy) as handle:
        out = pipe(**kwargs).images
    return out, handle


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU path of the script)")
    args = p.parse_args(argv)
    device = args.device
    n, steps = (6, 3) if args.smoke else (64, 20)
    failures = []

    def check(name: str, value: float, ok: bool) -> None:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.3g}", flush=True)
        if not ok:
            failures.append(name)

    model = load_embedded(device)
    pipe = model.pipe
    idx = list(range(n))
    native, _ = images(pipe, device, idx, steps)
    hooked, _ = images(pipe, device, idx, steps, strategy=CFG())
    check("hook CFG vs native CFG, max |diff|", float((hooked - native).abs().max()), bool(torch.equal(hooked, native)))
    half = n // 2
    split = torch.cat([images(pipe, device, idx[:half], steps, strategy=CFG())[0],
                       images(pipe, device, idx[half:], steps, strategy=CFG())[0]])
    # cuDNN / cuBLAS kernels may differ by batch shape: one 8-bit level is the tolerance that matters
    check("per-image seeds: one batch vs two, max |diff| (x255)", float((split - hooked).abs().max() * 255),
          bool((split - hooked).abs().max() * 255 <= 1.0))
    never, handle = images(pipe, device, idx, steps, strategy=AdaptiveGuidance(threshold=1.0))  # cosine never exceeds 1
    check("AG that never switches vs CFG, max |diff|", float((never - hooked).abs().max()),
          bool(torch.equal(never, hooked)))
    _, handle = images(pipe, device, idx, steps, strategy=AdaptiveGuidance(threshold=-1.0))
    nfe = handle.nfe.float().mean().item()
    check("AG switching after step 1: NFE per image (expect steps + 1)", nfe, nfe == steps + 1)
    stochastic, _ = images(pipe, device, idx, steps, eta=1.0, strategy=CFG())
    single, _ = images(pipe, device, idx, steps, eta=1.0, strategy=DynamicCFG(scales=[3.0], evaluators=["alignment"]))
    check("DynamicCFG with one candidate vs CFG, DDIM eta=1 (device generator restore), max |diff|",
          float((single - stochastic).abs().max()), bool((single - stochastic).abs().max() * 255 <= 1.0))
    if device != "cpu":
        cpu_pipe = load_embedded("cpu").pipe
        on_cpu, _ = images(cpu_pipe, "cpu", idx[:4], steps, strategy=CFG())
        # the CPU and CUDA generators draw different noise for one seed: compare the denoiser instead
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        t = torch.full((4,), 500)
        labels = torch.arange(4)
        with torch.no_grad():
            ref = cpu_pipe.unet(x, t, class_labels=labels).sample
            dev = pipe.unet(x.to(device), t.to(device), class_labels=labels.to(device)).sample.cpu()
        check("embedded denoiser, device vs CPU, max |diff|", float((dev - ref).abs().max()),
              bool((dev - ref).abs().max() < 1e-3))
        del on_cpu
    # Inception features and FID: device against CPU on the same uint8 images
    pixels = (hooked * 255).round().clamp(0, 255).to(torch.uint8)
    on_device = InceptionFeatures(device=device)(pixels.to(device)).double().cpu()
    on_host = InceptionFeatures(device="cpu")(pixels.cpu()).double()
    rel = float((on_device - on_host).norm() / on_host.norm())
    check("Inception features, device vs CPU, relative L2 (TF32 would give ~1e-3)", rel, rel < 1e-4)
    if failures:
        print(f"{len(failures)} check(s) failed: {', '.join(failures)}")
        return 1
    print(f"all checks passed on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
