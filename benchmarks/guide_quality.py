"""The autoguidance guide of the embedded model next to the main model, same protocol (issue #18).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/guide_quality.py quality --models main guide \
        --num-images 500 --steps 50 --threads 1 --state runs/guide_quality --out benchmarks/results/guide_quality
    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/guide_quality.py noise-levels --num-images 200 --threads 1 \
        --out benchmarks/results/guide_quality

quality: the model card's protocol (`pipelines/embedded/weights/MODEL_CARD.md`): the shipped DDIM
scheduler, image i gets seed (seed, i) and class i % 10, unguided (w = 1) and the pipeline's own CFG
at w = 3, FID against the CIFAR-10 test statistics (legacy_tf), class accuracy by the evaluation
classifier, HSV saturation. "guide" is the same pipeline with its UNet replaced by the guide
(`load_embedded_guide()`: same scheduler, same null class). 95% intervals: Wilson for class
accuracy, bootstrap (normal, `effects_stats.py`) for FID and mean saturation. Precision / recall
(k = 3, the 1,000 shipped reference features) come along: the bootstrap needs the stored features.

noise-levels: where the guide differs from the main model. Test images (a fixed random subset) are
noised to x_t at t = 100 ... 900 (one fixed noise per image and t); both models predict x0 with the
true class label, clipped to [-1, 1] as the sampler does. Per t: each model's RMS error against the
clean image, the RMS difference between the two predictions, the cosine between the two models'
errors (autoguidance wants the guide to err like the main model, only more), and the cosine between
the autoguidance direction D_main - D_guide and the main model's remaining error x0 - D_main
(positive: extrapolating away from the guide moves towards the data). Means over images, 95%
normal intervals.

Writes <out>/rows.json (both parts) and <out>/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, not an installed copy

from effects import bootstrap  # noqa: E402
from effects_stats import Z95, normal_interval, wilson  # noqa: E402

from evaluation.runner import RunSpec, StrategySpec, load_source, run_setting  # noqa: E402
from evaluation.spec import safe_name  # noqa: E402

METRICS = ("fid", "pr", "saturation", "class_accuracy")
SETTINGS = [("unguided", 1.0), ("CFG", 3.0)]  # the model card's two rows, the pipeline's own CFG
NOISE_LEVELS = list(range(100, 1000, 100))


def load_rows(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"quality": [], "noise_levels": None}


def save_rows(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def quality(args) -> None:
    from pipelines.embedded import load_embedded_guide

    rows_path = args.out / "rows.json"
    spec = RunSpec([StrategySpec(label, None, [w]) for label, w in SETTINGS], num_images=args.num_images,
                   batch_size=args.batch_size, seed=args.seed, steps=args.steps, metrics=METRICS,
                   reference="cifar10-test", device=args.device)
    source = load_source(spec)
    main_unet = source.pipe.unet
    for model in args.models:
        # Only the denoiser changes: scheduler, null class, seeds and classes are the pipeline's.
        source.pipe.unet = main_unet if model == "main" else load_embedded_guide(args.device)
        for label, w in SETTINGS:
            key = f"{model} {label}@{w:g}"
            if any(r["key"] == key and r["num_images"] == args.num_images and r["steps"] == args.steps
                   for r in load_rows(rows_path)["quality"]):
                continue
            state_path = args.state / f"steps{args.steps}" / f"{safe_name(key)}.pt"
            state_path.parent.mkdir(parents=True, exist_ok=True)
            start = time.time()
            row = run_setting(spec, source, key, None, w, state_path, device=args.device)["row"]
            n = args.num_images
            row.update(key=key, model=model, label=label, num_images=n, steps=args.steps, seed=args.seed,
                       batch_size=args.batch_size, threads=torch.get_num_threads())
            row["class_correct"] = round(row["class_accuracy"] * n)
            row["class_accuracy_ci"] = wilson(row["class_correct"], n)
            boot = bootstrap(state_path, source.inputs.reference, n, args.replicates)
            row["fid_ci"] = normal_interval(row["fid"], boot["fid"])
            row["saturation_mean_ci"] = normal_interval(row["saturation_mean"], boot["saturation_mean"])
            row["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
            data = load_rows(rows_path)
            data["quality"].append(row)
            save_rows(rows_path, data)
            print(f"{time.strftime('%H:%M:%S')} {key} N={n} steps={args.steps}: fid {row['fid']:.1f} "
                  f"acc {row['class_accuracy']:.3f} ({time.time() - start:.0f} s)", flush=True)
    write_markdown(args.out)


def _mean_ci(values: torch.Tensor) -> list[float]:
    """Mean and its 95% normal interval over images."""
    m, se = values.mean().item(), values.std().item() / math.sqrt(values.numel())
    return [m, m - Z95 * se, m + Z95 * se]


@torch.no_grad()
def noise_levels(args) -> None:
    from pipelines.embedded import load_embedded, load_embedded_guide
    from pipelines.embedded.training.common import DEFAULT_DATA, load_cifar10, to_model_range

    pipe = load_embedded(args.device).pipe
    main, guide = pipe.unet.eval(), load_embedded_guide(args.device)
    images, labels = load_cifar10(args.data or DEFAULT_DATA, "test")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[: args.num_images]
    x0, y = to_model_range(images[pick]).to(args.device), labels[pick].to(args.device)
    alphas_cumprod = pipe.scheduler.alphas_cumprod
    table = []
    for t in NOISE_LEVELS:
        a = alphas_cumprod[t].item()
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed * 1000 + t)).to(args.device)
        xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
        tt = torch.full((len(x0),), t, device=args.device)

        def predict_x0(unet):
            eps = unet(xt, tt, class_labels=y).sample
            return ((xt - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)

        d_main, d_guide = predict_x0(main), predict_x0(guide)
        flat = lambda v: v.flatten(1)  # noqa: E731
        rms = lambda v: flat(v).square().mean(1).sqrt()  # noqa: E731
        cos = lambda u, v: torch.nn.functional.cosine_similarity(flat(u), flat(v), dim=1)  # noqa: E731
        table.append({
            "t": t, "alpha_bar": a, "n": len(x0),
            "rms_error_main": _mean_ci(rms(d_main - x0)),
            "rms_error_guide": _mean_ci(rms(d_guide - x0)),
            "rms_main_minus_guide": _mean_ci(rms(d_main - d_guide)),
            "cos_errors": _mean_ci(cos(d_main - x0, d_guide - x0)),
            "cos_direction_vs_error": _mean_ci(cos(d_main - d_guide, x0 - d_main)),
        })
        print(f"t={t}: " + ", ".join(f"{k} {v[0]:.3f}" for k, v in table[-1].items() if isinstance(v, list)),
              flush=True)
    data = load_rows(args.out / "rows.json")
    data["noise_levels"] = {"seed": args.seed, "num_images": args.num_images, "rows": table}
    save_rows(args.out / "rows.json", data)
    write_markdown(args.out)


def _ci(v: list[float], digits: int = 3) -> str:
    return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]" if len(v) == 3 else \
        f"[{v[0]:.{digits}f}, {v[1]:.{digits}f}]"


def write_markdown(out: Path) -> None:
    data = load_rows(out / "rows.json")
    lines = ["# Autoguidance guide vs main model (embedded CIFAR-10)", "",
             "Written by `benchmarks/guide_quality.py`; 95% intervals (Wilson for accuracy, bootstrap for FID "
             "and saturation; noise-level table: normal over images).", ""]
    if data["quality"]:
        lines += ["| model | sampling | N | DDIM steps | FID vs test [95%] | class accuracy [95% Wilson] | "
                  "saturation mean [95%] | precision | recall | NFE / image | s / image |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in data["quality"]:
            fid = f"{r['fid']:.1f} [{r['fid_ci'][0]:.1f}, {r['fid_ci'][1]:.1f}]"
            acc = (f"{100 * r['class_accuracy']:.1f}% [{100 * r['class_accuracy_ci'][0]:.1f}, "
                   f"{100 * r['class_accuracy_ci'][1]:.1f}]")
            lines.append(f"| {r['model']} | {r['label']}, w = {r['scale']:g} | {r['num_images']} | {r['steps']} | "
                         f"{fid} | {acc} | {_ci([r['saturation_mean'], *r['saturation_mean_ci']])} | "
                         f"{r['precision']:.3f} | {r['recall']:.3f} | {r['nfe_per_image']:.0f} | "
                         f"{r['seconds_per_image']:.2f} |")
        lines.append("")
    if data["noise_levels"]:
        nl = data["noise_levels"]
        lines += [f"x0 predictions at fixed noise levels: {nl['num_images']} CIFAR-10 test images, true labels, "
                  "mean [95%] over images.", "",
                  "| t | alpha_bar | RMS error main | RMS error guide | RMS main - guide | cos(errors) | "
                  "cos(D_main - D_guide, x0 - D_main) |", "|---|---|---|---|---|---|---|"]
        for r in nl["rows"]:
            lines.append(f"| {r['t']} | {r['alpha_bar']:.3f} | {_ci(r['rms_error_main'])} | "
                         f"{_ci(r['rms_error_guide'])} | {_ci(r['rms_main_minus_guide'])} | {_ci(r['cos_errors'])} | "
                         f"{_ci(r['cos_direction_vs_error'])} |")
        lines.append("")
    (out / "results.md").write_text("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["quality", "noise-levels"])
    p.add_argument("--models", nargs="+", choices=["main", "guide"], default=["main", "guide"])
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replicates", type=int, default=200, help="bootstrap replicates per row")
    p.add_argument("--data", type=Path, default=None, help="folder holding CIFAR-10 test.npz (noise-levels)")
    p.add_argument("--state", type=Path, default=Path("runs/guide_quality"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/guide_quality"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part == "quality":
        quality(args)
    else:
        noise_levels(args)


if __name__ == "__main__":
    main()
