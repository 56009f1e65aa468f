"""The papers' effects on the embedded model at a sample size that decides them (issue #17), resumable.

    OMP_NUM_THREADS=1 nohup nice -n 5 python benchmarks/effects.py --threads 1 \
        --state runs/effects --out benchmarks/results/effects >> runs/effects.log 2>&1 &

Rerunning the same command continues where it stopped (the batch runner of `evaluation.runner`
checkpoints every setting after every batch of 50 images). Every row of `PLAN` runs at each N of
`--stages` (default 500, then 2,000), stage by stage in the plan's order (decision value first), so
whatever has finished when the job is stopped answers the most questions it can. A later stage
continues the same setting's checkpoint: image i keeps seed (seed, i) and class i % 10, so the first
500 images of the 2,000-image row are the 500-image row's images, and are not generated twice.

All rows: DDIM 20 steps (the shipped scheduler), FID against the 50k CIFAR-10 train statistics
(legacy_tf), precision / recall (k = 3, the 1,000 reference features shipped), mean HSV saturation,
class accuracy by the evaluation classifier. When a row finishes, its bootstrap replicates (FID,
saturation, precision; `effects_stats.py`) are computed from the checkpointed features and appended
with the row to `<out>/rows.json`; `effects_report.py` turns that file into tables and plots.
The checkpoints (16 MB per 2,000-image row: the Inception features) stay in --state, not in git.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, not an installed copy

from effects_stats import bootstrap_counts, weighted_fid, weighted_mean  # noqa: E402

from evaluation.runner import Progress, RunSpec, StrategySpec, load_source, run_setting  # noqa: E402
from evaluation.spec import safe_name  # noqa: E402
from guidance.atomic import atomic_write_text  # noqa: E402
from guidance import (APG, CFG, FDG, GFCG, MAMBOG, TCFG, AdaptiveGuidance, APGMix, Autoguidance,  # noqa: E402
                      CalibratedClassifierGuidance, CFGZeroStar, DynamicCFG, DynamicThresholding,
                      Interval, LinearAG, MimicScaleThresholding, PAG)

STEPS = 20
Tensor = torch.Tensor
METRICS = ("fid", "pr", "saturation", "class_accuracy")


def plan(steps: int = STEPS) -> list[dict]:
    """Rows in order of decision value: each question gets a first answer before any gets a second."""
    from pipelines.embedded import WEIGHTS_DIR

    def row(group, label, strategy, scale):
        config = None if strategy is None else strategy.to_config()
        return {"key": f"{label}@{scale:g}", "group": group, "label": label, "scale": float(scale), "strategy": config}

    coefficients = WEIGHTS_DIR / "linear_ag" / f"embedded-ddim-{steps}.safetensors"  # fitted per step count
    rows = [
        # (a) APG's claim is at high scales, where CFG oversaturates
        row("a", "CFG", CFG(), 10), row("a", "APG", APG(), 10),
        # (b) adaptive vs static truncation at equal NFE, all at w = 3 (CFG@3 is their full-NFE end)
        row("a", "CFG", CFG(), 3), row("b", "Interval 0-0.25", Interval(CFG(), 0.0, 0.25), 3),
        row("b", "AG x0 0.995", AdaptiveGuidance(threshold=0.995, similarity_space="x0"), 3),
        row("b", "LinearAG", LinearAG(str(coefficients)), 3) if coefficients.is_file() else None,
        # (d) Dynamic CFG against the top of the fixed-scale curve
        row("a", "CFG", CFG(), 15), row("d", "DynamicCFG alignment", DynamicCFG(evaluators=["alignment"]), 3),
        row("d", "DynamicCFG default", DynamicCFG(), 3),
        row("d", "DynamicCFG signed weights", DynamicCFG(weighting="signed"), 3),  # the paper's Eq. 7 as written
        row("a", "APG", APG(), 15),
        # (e) autoguidance (#18): the embedded guide (a quarter of the capacity, a fifth of the training)
        row("e", "ATG", Autoguidance(guide_model="embedded"), 2),
        row("e", "GFCG 2 + ATG", GFCG("embedded-guidance", scale=2.0, inner=Autoguidance(guide_model="embedded")), 2),
        row("e", "ATG", Autoguidance(guide_model="embedded"), 3),
        row("e", "ATG", Autoguidance(guide_model="embedded"), 1.5),
        # (c) classifier-based methods against the CFG curve
        row("c", "EluCD 0.05", CalibratedClassifierGuidance("embedded-guidance", scale=0.05, step_rule="x0"), 3),
        row("c", "GFCG 2 + CFG", GFCG("embedded-guidance", scale=2.0), 3),
        # the rest of the curves (CFG@4: the curve between w = 3 and 5, where Dynamic CFG's default lands)
        row("a", "CFG", CFG(), 5), row("a", "CFG", CFG(), 4), row("a", "APG", APG(), 5),
        row("a", "CFG", CFG(), 7.5), row("a", "APG", APG(), 7.5),
        row("b", "Interval 0-0.4", Interval(CFG(), 0.0, 0.4), 3),
        # static truncation at AG's own NFEs (21-24), so that the static curve is read, not interpolated
        row("b", "Interval 0-0.2", Interval(CFG(), 0.0, 0.2), 3),
        row("b", "Interval 0-0.1", Interval(CFG(), 0.0, 0.1), 3),
        row("b", "Interval 0-0.05", Interval(CFG(), 0.0, 0.05), 3),
        row("b", "Interval 0-0.6", Interval(CFG(), 0.0, 0.6), 3),
        row("b", "AG x0 0.990", AdaptiveGuidance(threshold=0.990, similarity_space="x0"), 3),
        row("b", "AG eps 0.995", AdaptiveGuidance(threshold=0.995, similarity_space="eps"), 3),
        row("a", "unguided", None, 1), row("a", "CFG", CFG(), 1.5), row("a", "APG", APG(), 1.5),
        row("a", "APG", APG(), 3),
        row("c", "EluCD 0.02", CalibratedClassifierGuidance("embedded-guidance", scale=0.02, step_rule="x0"), 3),
        row("c", "GFCG 4 alone", GFCG("embedded-guidance", scale=4.0, inner=None), 3),
        row("c", "GFCG 4 + CFG", GFCG("embedded-guidance", scale=4.0), 3),
        row("a", "APG r=5", APG(norm_threshold=5.0), 10), row("a", "APG r=1", APG(norm_threshold=1.0), 10),
        row("a", "CFG", CFG(), 20), row("d", "DynamicCFG fixed weights", DynamicCFG(weighting="fixed"), 3),
        # (f) the field's rules on the CFG curve (#29): at the scale where their claim lies (the high-scale fixes
        # at w = 10, the others beside CFG@3); FDG takes its own scales (the call's 3 turns CFG on)
        row("f", "DynamicThresholding", DynamicThresholding(CFG(), percentile=0.995, max_value=1.0), 10),
        row("f", "CFG-Zero*", CFGZeroStar(), 3), row("f", "TCFG", TCFG(), 3), row("f", "MAMBO-G", MAMBOG(), 10),
        row("f", "APG-Mix", APGMix(), 10),  # CFG++ is refused on the shipped DDIM (it clips x0): not a row here
        row("f", "FDG 10,5", FDG((10.0, 5.0)), 3), row("f", "MimicScale 3", MimicScaleThresholding(mimic_scale=3.0), 10),
        # (p) a perturbed denoiser (#30): PAG on the UNet's mid-block self-attention, beside CFG@3 (3 NFE a step)
        row("p", "PAG 3", PAG(pag_scale=3.0), 3),
    ]
    return [r for r in rows if r is not None]


def checkpoint_features(state_path: Path, n: int) -> tuple[Tensor, Tensor]:
    """The Inception features (n, 2048) and saturations (n,) of a row's first n images, in image order."""
    metrics = torch.load(state_path, map_location="cpu", weights_only=True)["metrics"]
    inception = metrics["inception"]
    # torchmetrics list states: one tensor per batch (older checkpoints: one tensor)
    features, indices, saturation = (torch.cat(v) if isinstance(v, list) else v for v in (
        inception["features"], inception["indices"], metrics["saturation"]["saturation"]))
    if len(indices) < n:
        raise ValueError(f"{state_path} holds {len(indices)} images; n={n} asked; allowed: n <= {len(indices)}")
    order = indices.argsort()
    return features[order][:n], saturation[order][:n]


def bootstrap(state_path: Path, reference, n: int, replicates: int, real_features: Tensor | None = None,
              real_radii=None, device: str = "cpu") -> dict[str, list[float]]:
    """Bootstrap replicates of FID, mean saturation and precision from a finished row's checkpoint."""
    from evaluation.precision_recall import _squared_distances

    features, saturation = checkpoint_features(state_path, n)
    counts = bootstrap_counts(n, replicates)
    mu, sigma = reference.on("cpu")
    out = {"fid": weighted_fid(features.to(device), mu, sigma, counts).tolist(),
           "saturation_mean": weighted_mean(saturation, counts).tolist()}
    if real_features is not None:
        real = real_features.double()
        inside = (_squared_distances(features.double(), real, real.square().sum(1)) <= real_radii).any(1)
        out["precision"] = weighted_mean(inside.double(), counts).tolist()
    return out



def load_rows(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"rows": []}


@contextmanager
def exclusive(lock_path: Path):
    """Hold an exclusive lock on lock_path (POSIX flock; elsewhere no lock: run one job per --out there)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def append_row(rows_path: Path, row: dict, meta: dict, lock_path: Path) -> None:
    """Append one finished row to rows.json. Two jobs may share one --out (each on its own rows, its own
    core): the read-append-write runs under a lock, or one job's row could overwrite the other's."""
    with exclusive(lock_path):
        data = load_rows(rows_path)  # re-read: another job or the report may have written meanwhile
        data["meta"] = meta
        data["rows"].append(row)
        atomic_write_text(rows_path, json.dumps(data, indent=1))


def main(argv=None, make_plan=plan) -> None:
    """make_plan(steps) -> rows: another measurement's plan run by the same machinery (elucd_step_rule.py)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, nargs="+", default=[500, 2000])
    p.add_argument("--state", type=Path, default=Path("runs/effects"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/effects"))
    p.add_argument("--only", nargs="*", default=None,
                   help="row keys to run, in this order (default: the whole plan, in its order)")
    p.add_argument("--replicates", type=int, default=200, help="bootstrap replicates per row")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=STEPS, help="DDIM steps (20; fewer only for smoke runs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(n % args.batch_size for n in args.stages) or args.stages != sorted(args.stages):
        raise ValueError(f"--stages {args.stages}: allowed: increasing multiples of --batch-size {args.batch_size}")
    rows_path = args.out / "rows.json"
    previous = load_rows(rows_path).get("meta", {})
    for name in ("steps", "seed", "batch_size"):
        if name in previous and previous[name] != getattr(args, name):
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: {rows_path} holds rows made with "
                             f"{previous[name]}; allowed: the same, or a new --out and --state")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.state / "state").mkdir(parents=True, exist_ok=True)
    todo = [r for r in make_plan(args.steps) if args.only is None or r["key"] in args.only]
    if args.only:  # in the order given: a background job runs the rows that decide most first
        todo.sort(key=lambda r: args.only.index(r["key"]))
    unknown = set(args.only or ()) - {r["key"] for r in todo}
    if unknown:
        allowed = [r["key"] for r in make_plan(args.steps)]
        raise ValueError(f"--only: {sorted(unknown)} not in the plan; allowed: {allowed}")
    spec = RunSpec([StrategySpec("CFG", None, [3.0])], num_images=args.stages[0], batch_size=args.batch_size,
                   seed=args.seed, steps=args.steps, metrics=METRICS, reference="cifar10-train", device=args.device)
    source = load_source(spec)
    reference = source.inputs.reference
    real = reference.features
    real_radii = None
    if real is not None:
        from evaluation.precision_recall import knn_radii

        real_radii = knn_radii(real, 3)
    for n in args.stages:
        for item in todo:
            data = load_rows(rows_path)
            if any(r["key"] == item["key"] and r["num_images"] == n for r in data["rows"]):
                continue
            state_path = args.state / "state" / f"{safe_name(item['key'])}.pt"
            if state_path.is_file():
                done = int(torch.load(state_path, map_location="cpu", weights_only=True)["done_batches"])
                if done * args.batch_size > n:
                    print(f"skip {item['key']} at N={n}: its checkpoint already holds {done * args.batch_size} images")
                    continue
            run_spec = RunSpec([StrategySpec(item["label"], item["strategy"], [item["scale"]])], num_images=n,
                               batch_size=args.batch_size, seed=args.seed, steps=args.steps, metrics=METRICS,
                               reference="cifar10-train", device=args.device)
            start = time.time()
            bar = Progress(n, enabled=True)  # one bar per row: images done of N, rate, ETA
            result = run_setting(run_spec, source, item["key"], item["strategy"], item["scale"], state_path,
                                 progress=bar, device=args.device)
            bar.close()
            row = {**item, **result["row"], "key": item["key"], "group": item["group"], "steps": args.steps,
                   "seed": args.seed, "replicates": args.replicates}
            row["num_images"] = n  # the metrics' own count arrives as a float
            row["class_correct"] = round(row["class_accuracy"] * n)
            row["recall_reference_n"] = None if real is None else int(real.shape[0])
            row["boot"] = bootstrap(state_path, reference, n, args.replicates, real, real_radii, args.device)
            row["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
            meta = {"steps": args.steps, "scheduler": "DDIM (shipped)", "metrics": list(METRICS),
                    "reference": "cifar10-train (50k, legacy_tf)", "seed": args.seed,
                    "batch_size": args.batch_size, "device": args.device,
                    "threads": torch.get_num_threads(), "stages": args.stages}
            append_row(rows_path, row, meta, args.state / "rows.lock")
            print(f"{time.strftime('%H:%M:%S')} {item['key']} N={n}: fid {row['fid']:.2f} "
                  f"acc {row['class_accuracy']:.3f} "
                  f"sat {row['saturation_mean']:.4f} nfe {row['nfe_per_image']:.1f} "
                  f"({time.time() - start:.0f} s, {row['seconds_per_image']:.3f} s/img sampling)", flush=True)


if __name__ == "__main__":
    main()
