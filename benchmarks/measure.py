"""Strategies against CFG on the embedded model, same seeds, side by side in one run.

    python benchmarks/measure.py adaptive   --num-images 200 --steps 20 50 --out benchmarks/results/adaptive
    python benchmarks/measure.py classifier --num-images 200 --steps 20 --out benchmarks/results/classifier

For every step count, CFG runs first; every other setting generates the same images (image i gets
seed (seed, i) and class i % 10, as in `guidance-eval run`) and is compared with CFG's image for
image: mean SSIM / PSNR, plus NFE per image, class accuracy (the independent evaluation
classifier), FID against the CIFAR-10 test statistics (legacy_tf, N = --num-images: biased upwards at
small N, compare rows, not papers), saturation, and seconds per image with the time ratio to CFG
(interleaved per batch, so machine load hits all settings alike).

Suites: "adaptive" (issue #5: AG at thresholds in x0 space, and in eps space, LinearAG with coefficients
fitted for the step count) and "classifier" (issue #6: EluCD, GFCG, GFCG + CFG at the same base
scale). Writes <out>/results.json and <out>/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from tqdm.auto import tqdm

from evaluation.runner import RunSpec, StrategySpec, load_source
from evaluation.suite import MetricSuite
from guidance import CFG, GFCG, AdaptiveGuidance, CalibratedClassifierGuidance, LinearAG
from pipelines import apply_guidance

LINEAR_AG_DIR = Path(__file__).resolve().parents[1] / "pipelines" / "embedded" / "weights" / "linear_ag"


def linear_ag_for(pipe, steps: int, scale: float, fit_samples: int) -> LinearAG:
    """Shipped coefficients for this step count, fitted (and saved) first if missing."""
    from pipelines.linear_ag_fit import fit_pipeline

    path = LINEAR_AG_DIR / f"embedded-ddim-{steps}.safetensors"
    if not path.is_file():
        conditions = [i % pipe.num_classes for i in range(fit_samples)]
        coefficients = fit_pipeline(pipe, conditions, steps, scale, batch_size=32, seed=10_000)
        path.parent.mkdir(parents=True, exist_ok=True)
        coefficients.save(path)
    return LinearAG(str(path))


def adaptive_settings(pipe, steps: int, args) -> list[tuple[str, object]]:
    settings = [(f"AG x0 {t:.3f}", AdaptiveGuidance(threshold=t, similarity_space="x0")) for t in args.thresholds]
    settings += [(f"AG eps {t:.3f}", AdaptiveGuidance(threshold=t, similarity_space="eps"))
                 for t in args.eps_thresholds]
    return settings + [("LinearAG", linear_ag_for(pipe, steps, args.scale, args.fit_samples))]


def classifier_settings(pipe, steps: int, args) -> list[tuple[str, object]]:
    elucd = [(f"EluCD {s:g}", CalibratedClassifierGuidance("embedded-guidance", scale=s, step_rule="x0"))
             for s in args.elucd_scale]  # the x0 rule, whose scales the shipped results use
    gfcg = [(f"GFCG {s:g} alone", GFCG("embedded-guidance", scale=s, inner=None)) for s in args.gfcg_scale]
    gfcg_cfg = [(f"GFCG {s:g} + CFG", GFCG("embedded-guidance", scale=s)) for s in args.gfcg_scale]
    return elucd + gfcg + gfcg_cfg


SUITES = {"adaptive": adaptive_settings, "classifier": classifier_settings}


def measure(source, settings, steps: int, scale: float, num_images: int, batch_size: int, seed: int,
            device: str) -> list[dict]:
    """One row per setting; settings[0] is the baseline the others are compared with image for image."""
    suites = {label: MetricSuite(("fid", "saturation", "class_accuracy"), source.inputs, torch.device(device),
                                 num_images) for label, _ in settings}
    acc = {label: {"nfe": 0.0, "seconds": 0.0, "ssim": [], "psnr": []} for label, _ in settings}
    batches = [list(range(i, min(i + batch_size, num_images))) for i in range(0, num_images, batch_size)]
    for indices in tqdm(batches, desc=f"{steps} steps", unit="batch"):
        baseline = None
        for label, strategy in settings:  # interleaved per batch: load affects every setting alike
            start = time.perf_counter()
            with apply_guidance(source.pipe, strategy) as handle:
                images = source.call(indices, scale, steps, seed, device)
            acc[label]["seconds"] += time.perf_counter() - start
            acc[label]["nfe"] += float(handle.nfe.sum())
            suites[label].update(images.to(device), source.labels(indices), None, torch.tensor(indices))
            x = images.float() / 255
            baseline = x if baseline is None else baseline
            acc[label]["ssim"].append(structural_similarity_index_measure(x, baseline, data_range=1.0,
                                                                          reduction="none"))
            acc[label]["psnr"].append(peak_signal_noise_ratio(x, baseline, data_range=1.0, reduction="none",
                                                              dim=(1, 2, 3)))
    base_seconds = acc[settings[0][0]]["seconds"]
    rows = []
    for label, strategy in settings:
        a = acc[label]
        metrics = suites[label].compute()
        psnr = torch.cat(a["psnr"])
        rows.append({
            "steps": steps, "setting": label, "strategy": strategy.to_config(), "num_images": num_images,
            "nfe_per_image": a["nfe"] / num_images, "nfe_saving": 1 - a["nfe"] / (2 * steps * num_images),
            "ssim_vs_cfg": float(torch.cat(a["ssim"]).mean()),
            "psnr_vs_cfg": float(psnr[torch.isfinite(psnr)].mean()) if torch.isfinite(psnr).any() else float("inf"),
            **metrics, "seconds_per_image": a["seconds"] / num_images, "time_ratio_to_cfg": a["seconds"] / base_seconds,
        })
    return rows


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Arguments every measurement script shares: seed, device, CPU threads, output folder."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)


def embedded_source(args) -> object:
    """The embedded model with the metrics' inputs (FID reference, evaluation classifier), on args.device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = RunSpec([StrategySpec("CFG", None, [3.0])], num_images=args.num_images, device=args.device)
    return load_source(spec)


def markdown(rows: list[dict]) -> str:
    cols = [("steps", "{}"), ("setting", "{}"), ("nfe_per_image", "{:.2f}"), ("nfe_saving", "{:.1%}"),
            ("ssim_vs_cfg", "{:.4f}"), ("psnr_vs_cfg", "{:.2f}"), ("class_accuracy", "{:.3f}"), ("fid", "{:.2f}"),
            ("saturation_mean", "{:.4f}"), ("seconds_per_image", "{:.3f}"), ("time_ratio_to_cfg", "{:.3f}")]
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[c]) if c in r else "-" for c, fmt in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=sorted(SUITES))
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    p.add_argument("--scale", type=float, default=3.0, help="CFG scale of every setting (default 3)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.990, 0.991, 0.993, 0.995])
    p.add_argument("--eps-thresholds", type=float, nargs="*", default=[0.995],
                   help="AG thresholds in eps space too (the paper's space; this pixel model's eps cosine starts "
                        "near 1 and falls, so every eps threshold below its start switches at once)")
    p.add_argument("--fit-samples", type=int, default=64, help="LinearAG fit trajectories if not shipped")
    p.add_argument("--elucd-scale", type=float, nargs="+", default=[0.02, 0.05])
    p.add_argument("--gfcg-scale", type=float, nargs="+", default=[2.0, 4.0])
    add_run_args(p)
    args = p.parse_args(argv)
    source = embedded_source(args)
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"suite": args.suite, "command": " ".join(sys.argv), "scale": args.scale, "device": args.device,
            "reference": "CIFAR-10 test 10k, legacy_tf", "num_images": args.num_images}
    for steps in args.steps:  # results written after every step count: a long run keeps what it finished
        settings = [("CFG", CFG())] + SUITES[args.suite](source.pipe, steps, args)
        rows += measure(source, settings, steps, args.scale, args.num_images, args.batch_size, args.seed, args.device)
        print(markdown(rows), flush=True)
        (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        (args.out / "results.md").write_text(f"`{meta['command']}`\n\n" + markdown(rows))


if __name__ == "__main__":
    main()
