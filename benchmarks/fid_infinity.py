"""FID extrapolated to infinitely many images, for rows of the effects measurement (Chong & Forsyth, 2020).

    python benchmarks/fid_infinity.py [--keys "ATG@1.5" "ATG@2" "CFG@3"] [--n 5000] [--replicates 200]

The FID of N images is biased upwards by about k / N, and k differs between generators (it grows with the
spread of their features), so the difference of two rows' FIDs can change with N: ATG@2 - CFG@3 was +1.5 at
N = 2,000 and -0.0 at N = 5,000, on the same first 2,000 images. Chong & Forsyth ("Effectively Unbiased FID
and Inception Score and where to find them", CVPR 2020) draw random subsets of 15 sizes from 5,000 to 50,000
of a 50,000-image pool, fit FID_N = FID_inf + k / N by least squares and read the line at 1/N = 0.

Here the pool is a row's n images (5,000), so the sizes run from the feature dimension d = 2,048 (below it the
sample covariance is singular and FID_N leaves the k / N regime) up to n, evenly spaced in 1/N (`fit_sizes`);
FID_N is the FID of one random subset of N of the pool, drawn without replacement. Given the pool that has the
expectation FID(pool) + k (1/N - 1/n): the same slope, so the line still extrapolates to FID_inf. The
extrapolation reaches below the fitted range of 1/N by more than the range's own width, so its interval is wide
by nature. The interval of FID_inf and of a difference: paired bootstrap (`replicates`, default 200): every
replicate resamples the pool's images and redraws the subsets, the same indices for every row, and the
interval is the estimate +- 1.96 replicate standard deviations (`effects_stats.normal_interval`). The verdict
is also read on sub-ranges of the sizes (`FIT_RANGES`), so a reader sees whether it rests on where the line is
fitted. Reads the checkpointed Inception features of `benchmarks/effects.py` (`--state`); writes
`<out>/fid_infinity.json` and `.md`.

Not written by hand where a library has it: torch-fidelity and clean-fid compute the FID of one image set,
neither fits FID_inf from stored features (clean-fid's FID_inf regenerates images through a generator).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, not an installed copy

from effects_stats import Z95, normal_interval, verdict, weighted_fid  # noqa: E402

from evaluation.spec import safe_name  # noqa: E402

Tensor = torch.Tensor
FEATURE_DIM = 2048  # Inception pool features: the smallest N whose sample covariance can have full rank
# sub-ranges of the sizes (smallest first) on which the verdict is read again: all, without the largest two,
# without the smallest two
FIT_RANGES = {"all sizes": slice(None), "smaller sizes": slice(None, -2), "larger sizes": slice(2, None)}


def fit_sizes(low: int, high: int, count: int = 6) -> list[int]:
    """`count` subset sizes from low to high, evenly spaced in 1/N (the axis of the fit)."""
    if not 0 < low < high or count < 3:
        raise ValueError(f"sizes from {low} to {high}, count={count}; allowed: 0 < low < high, count >= 3")
    return sorted({int(round(1.0 / x)) for x in np.linspace(1.0 / low, 1.0 / high, count)})


def subset_counts(n: int, sizes, replicates: int, seed: int = 0) -> dict[int, Tensor]:
    """For every size, (1 + replicates, n) multiplicities: row 0 a random subset of `size` of the n images (the
    estimate), row b a random subset of `size` of the b-th bootstrap resample of them. The same for every row
    of the effects run (paired), reproducible from the seed."""
    rng = np.random.default_rng([seed, n])
    pools = [np.arange(n)] + [rng.integers(0, n, n) for _ in range(replicates)]
    out = {}
    for size in sizes:
        if not 0 < size <= n:
            raise ValueError(f"size={size}; allowed: 1 <= size <= {n} (the images there are)")
        picks = [pool[rng.permutation(n)[:size]] for pool in pools]
        out[size] = torch.from_numpy(np.stack([np.bincount(p, minlength=n) for p in picks])).double()
    return out


def fid_by_size(features: Tensor, mu: Tensor, sigma: Tensor, counts: dict[int, Tensor]) -> np.ndarray:
    """(1 + replicates, len(counts)): every replicate's FID at every size."""
    return np.stack([weighted_fid(features, mu, sigma, c).numpy() for c in counts.values()], 1)


def extrapolate(sizes, fids: np.ndarray) -> np.ndarray:
    """FID_inf: the least-squares line through (1/N, FID_N), read at 1/N = 0; fids (..., len(sizes))."""
    x = 1.0 / np.asarray(sizes, dtype=np.float64)
    design = np.stack([np.ones_like(x), x], 1)
    coef, *_ = np.linalg.lstsq(design, np.asarray(fids, dtype=np.float64).reshape(-1, len(x)).T, rcond=None)
    return coef[0].reshape(np.shape(fids)[:-1])


def fid_infinity(rows: dict[str, Tensor], mu: Tensor, sigma: Tensor, sizes=None, replicates: int = 200,
                 progress: bool = True, cache: Path | None = None) -> dict:
    """FID_N, FID_inf and its interval for every row, and every pair's difference of FID_inf, on every fit range.

    sizes: default `fit_sizes(FEATURE_DIM, n)`. cache: a folder keeping each row's FIDs by size (they depend only
    on its first n images, the sizes, the replicates and the reference statistics, which `main` fixes to
    cifar10-train), so a row added later does not recompute the others."""
    n = min(len(f) for f in rows.values())
    sizes = fit_sizes(FEATURE_DIM, n) if sizes is None else sorted(s for s in sizes if s <= n)
    if len(sizes) < 4:
        raise ValueError(f"n={n} images allow the sizes {list(sizes)}; allowed: at least 4 (two per fit sub-range)")
    counts = None
    curves = {}
    for k, f in tqdm(rows.items(), desc="FID by N", disable=not progress):
        path = None if cache is None else cache / f"{safe_name(k)}-n{n}-r{replicates}-{'-'.join(map(str, sizes))}.npy"
        if path is not None and path.is_file():
            curves[k] = np.load(path)
            continue
        counts = counts or subset_counts(n, sizes, replicates)
        curves[k] = fid_by_size(f[:n], mu, sigma, counts)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, curves[k])
    out = {"n": n, "sizes": sizes, "replicates": replicates, "rows": {}, "differences": [],
           "fit_ranges": {name: sizes[part] for name, part in FIT_RANGES.items()}}
    inf = {name: {k: extrapolate(sizes[part], c[:, part]) for k, c in curves.items()}  # (1 + replicates,)
           for name, part in FIT_RANGES.items()}
    for k, c in curves.items():
        out["rows"][k] = {"fid_by_size": c[0].tolist(), "fid_inf": float(inf["all sizes"][k][0]),
                          "interval": [float(v) for v in normal_interval(inf["all sizes"][k][0],
                                                                         inf["all sizes"][k][1:])]}
    keys = list(rows)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            at_n = curves[a][:, -1] - curves[b][:, -1]  # the ordinary paired difference at the largest N
            entry = {"a": a, "b": b, f"fid_at_{sizes[-1]}": float(at_n[0]),
                     "interval_at_n": [float(v) for v in normal_interval(at_n[0], at_n[1:])], "by_range": {}}
            for name in FIT_RANGES:
                d = inf[name][a] - inf[name][b]
                interval = [float(v) for v in normal_interval(d[0], d[1:])]
                # the claim: a has the lower FID_inf
                entry["by_range"][name] = {"fid_inf": float(d[0]), "interval": interval,
                                           "verdict": verdict(interval, -1)}
            entry.update(entry["by_range"]["all sizes"])
            out["differences"].append(entry)
    return out


def markdown(result: dict) -> str:
    sizes = result["sizes"]
    lines = [f"# FID extrapolated to infinitely many images (n = {result['n']}, {result['replicates']} paired "
             "bootstrap replicates)", "",
             f"FID_N: one random subset of N of the row's images; sizes from the feature dimension to n, evenly "
             f"spaced in 1/N ({', '.join(map(str, sizes))}); the line fitted in 1/N and read at 0.", "",
             f"| row | {' | '.join(f'FID_{s}' for s in sizes)} | FID_inf [95%] |",
             "|---|" + "---|" * (len(sizes) + 1)]
    for k, r in result["rows"].items():
        lo, hi = r["interval"]
        lines.append(f"| {k} | {' | '.join(f'{v:.2f}' for v in r['fid_by_size'])} | "
                     f"{r['fid_inf']:.2f} [{lo:.2f}, {hi:.2f}] |")
    ranges = result["fit_ranges"]
    lines += ["", "The claim of each row: a has the lower FID_inf. Fit ranges: "
              + "; ".join(f"{name}: {part[0]}-{part[-1]}" for name, part in ranges.items()) + ".", "",
              f"| a - b | at N = {sizes[-1]} | " + " | ".join(f"FID_inf, {name}" for name in ranges) + " |",
              "|---|---|" + "---|" * len(ranges)]
    for d in result["differences"]:
        nlo, nhi = d["interval_at_n"]
        cells = [f"{r['fid_inf']:+.2f} [{r['interval'][0]:+.2f}, {r['interval'][1]:+.2f}] **{r['verdict']}**"
                 for r in d["by_range"].values()]
        lines.append(f"| {d['a']} - {d['b']} | {d[f'fid_at_{sizes[-1]}']:+.2f} [{nlo:+.2f}, {nhi:+.2f}] | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", nargs="+", default=["ATG@1.5", "ATG@2", "CFG@3"], help="rows of benchmarks/effects.py")
    p.add_argument("--n", type=int, default=5000, help="images per row (the first n; every row must have them)")
    p.add_argument("--state", type=Path, default=Path("runs/effects/state"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/effects"))
    p.add_argument("--replicates", type=int, default=200)
    p.add_argument("--cache", type=Path, default=Path("runs/effects/fid_infinity"),
                   help="each row's FIDs by size, kept for later runs (not in git)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from effects import checkpoint_features

    from evaluation.runner import load_reference

    rows = {k: checkpoint_features(args.state / f"{safe_name(k)}.pt", args.n)[0] for k in args.keys}
    mu, sigma = load_reference("cifar10-train", 2048).on("cpu")
    result = fid_infinity(rows, mu, sigma, replicates=args.replicates, cache=args.cache)
    result["z"] = Z95
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fid_infinity.json").write_text(json.dumps(result, indent=1))
    (args.out / "fid_infinity.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
