"""Measure the float32 noise of the evaluated numbers across batch compositions and thread counts.

    OMP_NUM_THREADS=2 PYTHONPATH=. python tests/inception_noise.py [--data ../shared/data]

The distributed tests compare a 2-process run with a 1-process run: the same image indices, seeds and
labels, but in other batches (i % 2 == rank; a shard's last batch may be shorter) and possibly on other
thread counts. float32 convolutions are not batch-size invariant, so the sampler's output can differ in
its last bits (and, rarely, by one uint8 level after rounding), and the Inception features likewise.
This script generates the distributed test's 7 images of each setting under several batch compositions
and thread counts, evaluates them the same way, and prints the largest relative spread of every
metric; tests/test_distributed.py takes its tolerances from it.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from evaluation import InceptionFeatures, compute_reference_stats
from evaluation.runner import RunSpec, StrategySpec, load_source
from evaluation.suite import MetricSuite
from guidance import from_config
from pipelines import apply_guidance

SETTINGS = {"CFG@3": {"name": "CFG", "params": {}},
            "AG@3": {"name": "AdaptiveGuidance", "params": {"threshold": 0.5}}}
COMPOSITIONS = {"batch 2 in order": [[0, 1], [2, 3], [4, 5], [6]],
                "2 ranks (i % 2)": [[0, 2], [4, 6], [1, 3], [5]],
                "batch 7": [list(range(7))], "batch 1": [[i] for i in range(7)]}
METRICS = ("fid", "kid", "pr", "saturation", "class_accuracy")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=None, help="folder holding cifar10/test.npz (default: random reference)")
    args = p.parse_args()
    torch.set_num_threads(1)
    source = f"{args.data}/cifar10/test.npz" if args.data else \
        np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    ref = compute_reference_stats(source, InceptionFeatures(device="cpu"), batch_size=24, limit=24,
                                  keep_features=True, progress=False, shuffle_seed=0)
    spec = RunSpec(strategies=[StrategySpec.parse({"label": "x", "strategy": None, "scales": [1.0]})],
                   num_images=7, batch_size=2, steps=3, metrics=METRICS, device="cpu")
    src = load_source(spec)
    src.inputs.reference = ref
    print(f"reference: {'CIFAR-10 test, 24 images' if args.data else '24 random images'}; "
          "base: batch 2 in order, 1 thread")
    worst: dict[str, float] = {}
    for key, config in SETTINGS.items():
        results = {}
        for (name, batches), threads in itertools.product(COMPOSITIONS.items(), (1, 2)):
            torch.set_num_threads(threads)
            suite = MetricSuite(METRICS, src.inputs, torch.device("cpu"), 7)
            for b in batches:  # generated and evaluated in the same batches, as a process of the runner does
                with apply_guidance(src.pipe, from_config(config)):
                    images = src.call(b, 3.0, 3, 0, "cpu")
                suite.update(images, src.labels(b), None, torch.tensor(b))
            results[(name, threads)] = suite.compute()
        base = results[("batch 2 in order", 1)]
        for (name, threads), out in results.items():
            rel = {k: abs(out[k] - v) / abs(v) if v else abs(out[k]) for k, v in base.items()
                   if isinstance(v, float)}
            for k, v in rel.items():
                worst[k] = max(worst.get(k, 0.0), v)
            print(f"{key} {name:>18}, {threads} thread(s): " + ", ".join(f"{k} {v:.1e}" for k, v in rel.items()))
    print("largest relative spread: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


if __name__ == "__main__":
    main()
