"""Dynamic CFG (issue #7) against every fixed scale of its candidate set, on the embedded model.

    python benchmarks/measure_dynamic_cfg.py --num-images 200 --steps 25 --threads 1 \
        --out benchmarks/results/dynamic_cfg

Same seeds for every setting (image i gets seed (seed, i) and class i % 10, as in `guidance-eval
run`), interleaved per batch (`benchmarks/measure.py`), so the timing ratio is measured side by
side under the same machine load. Judged by the independent evaluation classifier (class accuracy),
FID against the CIFAR-10 test statistics (legacy_tf; N = --num-images, biased upwards at small N:
compare rows) and saturation. Overhead = seconds of dynamic CFG / mean seconds of the fixed-scale
CFG rows (same 2 NFE per step). Writes <out>/results.json, <out>/results.md and
<out>/schedules.png (chosen scale against step, 3 samples per class).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import add_run_args, embedded_source, markdown, measure  # noqa: E402

from guidance import CFG, DynamicCFG, plot_schedules  # noqa: E402
from guidance.dynamic_cfg import PAPER_SCALES  # noqa: E402


class _Recorder:
    """Keeps the chosen schedule of every pipeline call (reset() starts a new one)."""

    def __init__(self, strategy: DynamicCFG):
        self.histories: list[torch.Tensor] = []
        original = strategy.reset

        def reset():
            if strategy.history is not None:
                self.histories.append(strategy.history)
            original()

        strategy.reset = reset
        self.strategy = strategy

    def all(self) -> torch.Tensor:
        self.strategy.reset()
        return torch.cat(self.histories)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scales", type=float, nargs="+", default=list(PAPER_SCALES))
    p.add_argument("--weighting", default="adaptive")
    p.add_argument("--normalize", default="none")
    p.add_argument("--evaluators", nargs="+", default=["alignment", "quality"])
    p.add_argument("--extra", action="append", default=[],
                   help="extra DynamicCFG variants as JSON params, e.g. '{\"normalize\": \"candidates\"}'")
    add_run_args(p)
    args = p.parse_args(argv)
    source = embedded_source(args)
    dynamic = DynamicCFG(args.scales, args.evaluators, weighting=args.weighting, normalize=args.normalize)
    recorder = _Recorder(dynamic)
    settings = [(f"CFG {s:g}", CFG(s)) for s in args.scales] + [("DynamicCFG", dynamic)]
    for i, extra in enumerate(args.extra):
        params = {"scales": args.scales, "evaluators": args.evaluators, **json.loads(extra)}
        settings.append((f"DynamicCFG {extra}", DynamicCFG(**params)))
    # The call's own guidance_scale only switches the unconditional branch on; every setting sets its scale.
    rows = measure(source, settings, args.steps, 3.0, args.num_images, args.batch_size, args.seed, args.device)
    cfg_seconds = sum(r["seconds_per_image"] for r in rows if r["setting"].startswith("CFG")) / len(args.scales)
    for r in rows:
        r["time_ratio_to_cfg"] = r["seconds_per_image"] / cfg_seconds
    history = recorder.all()
    labels = torch.arange(len(history)) % 10
    best = max((r for r in rows if r["setting"].startswith("CFG")), key=lambda r: r["class_accuracy"])
    dyn = next(r for r in rows if r["setting"] == "DynamicCFG")
    verdict = {
        "best_fixed": best["setting"],
        "accuracy_gain": dyn["class_accuracy"] - best["class_accuracy"],
        "fid_difference": dyn["fid"] - best["fid"],
        "overhead": dyn["time_ratio_to_cfg"] - 1,
        "target_met": bool(dyn["class_accuracy"] > best["class_accuracy"] and dyn["fid"] <= best["fid"]
                           and dyn["time_ratio_to_cfg"] <= 1.10),
        "mean_scale_by_step": history.mean(0).tolist(),
        "mean_scale_by_class": [float(history[labels == c].mean()) for c in range(10)],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(sys.argv), "device": args.device, "threads": torch.get_num_threads(),
            "steps": args.steps, "num_images": args.num_images, "scheduler": "DDIM (shipped)",
            "reference": "CIFAR-10 test 10k, legacy_tf", "dynamic": dynamic.to_config()}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "verdict": verdict,
                                                       "schedules": history.tolist()}, indent=2))
    table = markdown(rows)
    (args.out / "results.md").write_text(f"`{meta['command']}`\n\n{table}\n```\n{json.dumps(verdict, indent=1)}\n```\n")
    from pipelines.embedded import CIFAR10_CLASSES

    fig = plot_schedules(history, labels, class_names=CIFAR10_CLASSES, per_class=3, scales=args.scales)
    fig.savefig(args.out / "schedules.png", dpi=110)
    print(table)
    print(json.dumps(verdict, indent=1))


if __name__ == "__main__":
    main()
