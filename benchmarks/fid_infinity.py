"""FID extrapolated to infinitely many images, for rows of the effects measurement (Chong & Forsyth, 2020).

    python benchmarks/fid_infinity.py [--keys "ATG@1.5" "ATG@2" "CFG@3"] [--n 5000] [--replicates 50]

The FID of N images is biased upwards by about k / N, and k differs between generators (it grows with the
spread of their features), so the difference of two rows' FIDs can change with N: ATG@2 - CFG@3 was +1.5 at
N = 2,000 and -0.0 at N = 5,000, on the same first 2,000 images. Chong & Forsyth ("Effectively Unbiased FID
and Inception Score and where to find them", CVPR 2020) fit FID_N = FID_inf + k / N over several N and read
the line at 1/N = 0. Here FID_N is the mean FID over the disjoint consecutive blocks of N of the row's n
images (the same blocks for every row: paired), fitted by least squares in 1/N. The interval of FID_inf and
of a difference: paired bootstrap over images (every row resamples the same image indices), +-1.96 standard
errors around the estimate (`effects_stats.normal_interval`). Reads the checkpointed Inception features of
`benchmarks/effects.py` (`--state`); writes `<out>/fid_infinity.json` and `.md`.

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
SIZES = (1000, 1250, 1667, 2500, 5000)  # 1/N spread evenly-ish over [0.0002, 0.001], as Chong & Forsyth do


def block_counts(order: np.ndarray, size: int) -> Tensor:
    """(blocks, n) multiplicities of the disjoint consecutive blocks of `size` indices of `order`."""
    n = len(order)
    if not 0 < size <= n:
        raise ValueError(f"size={size}; allowed: 1 <= size <= {n} (the images there are)")
    blocks = [np.bincount(order[start:start + size], minlength=n) for start in range(0, n - size + 1, size)]
    return torch.from_numpy(np.stack(blocks)).double()


def fid_by_size(features: Tensor, mu: Tensor, sigma: Tensor, orders: list[np.ndarray], sizes) -> np.ndarray:
    """(len(orders), len(sizes)): for every image order, the mean FID over its blocks of each size."""
    out = np.zeros((len(orders), len(sizes)))
    for j, size in enumerate(sizes):
        counts = [block_counts(order, size) for order in orders]
        fids = weighted_fid(features, mu, sigma, torch.cat(counts)).numpy()  # one call: the Gram matrix once
        out[:, j] = fids.reshape(len(orders), -1).mean(1)
    return out


def extrapolate(sizes, fids: np.ndarray) -> np.ndarray:
    """FID_inf: the least-squares line through (1/N, FID_N), read at 1/N = 0; fids (..., len(sizes))."""
    x = 1.0 / np.asarray(sizes, dtype=np.float64)
    design = np.stack([np.ones_like(x), x], 1)
    coef, *_ = np.linalg.lstsq(design, np.asarray(fids, dtype=np.float64).reshape(-1, len(x)).T, rcond=None)
    return coef[0].reshape(np.shape(fids)[:-1])


def bootstrap_orders(n: int, replicates: int, seed: int = 0) -> list[np.ndarray]:
    """Image orders: the identity (the estimate), then `replicates` resamples, the same for every row."""
    rng = np.random.default_rng([seed, n])
    return [np.arange(n)] + [rng.integers(0, n, n) for _ in range(replicates)]


def fid_infinity(rows: dict[str, Tensor], mu: Tensor, sigma: Tensor, sizes=SIZES, replicates: int = 50,
                 progress: bool = True, cache: Path | None = None) -> dict:
    """FID_N, FID_inf and its interval for every row, and every pair's difference of FID_inf.

    cache: a folder keeping each row's FIDs by size (they depend only on its first n images, the sizes, the
    replicates and the reference statistics, which `main` fixes to cifar10-train), so a row added later does not
    recompute the others."""
    n = min(len(f) for f in rows.values())
    sizes = [s for s in sizes if s <= n]
    if len(sizes) < 3:
        raise ValueError(f"n={n} images allow {len(sizes)} of the sizes {list(sizes)}; allowed: at least 3")
    orders = bootstrap_orders(n, replicates)
    curves = {}
    for k, f in tqdm(rows.items(), desc="FID by N", disable=not progress):
        path = None if cache is None else cache / f"{safe_name(k)}-n{n}-r{replicates}-{'-'.join(map(str, sizes))}.npy"
        if path is not None and path.is_file():
            curves[k] = np.load(path)
            continue
        curves[k] = fid_by_size(f[:n], mu, sigma, orders, sizes)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, curves[k])
    inf = {k: extrapolate(sizes, c) for k, c in curves.items()}  # (1 + replicates,)
    out = {"n": n, "sizes": sizes, "replicates": replicates, "rows": {}, "differences": []}
    for k, c in curves.items():
        out["rows"][k] = {"fid_by_size": c[0].tolist(), "fid_inf": float(inf[k][0]),
                          "interval": [float(v) for v in normal_interval(inf[k][0], inf[k][1:])]}
    keys = list(rows)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            d = inf[a] - inf[b]
            at_n = curves[a][:, -1] - curves[b][:, -1]  # the ordinary paired difference at the largest N
            interval = [float(v) for v in normal_interval(d[0], d[1:])]
            out["differences"].append({
                "a": a, "b": b, "fid_inf": float(d[0]), "interval": interval,
                "verdict": verdict(interval, -1),  # the claim: a has the lower FID_inf
                f"fid_at_{sizes[-1]}": float(at_n[0]),
                "interval_at_n": [float(v) for v in normal_interval(at_n[0], at_n[1:])]})
    return out


def markdown(result: dict) -> str:
    sizes = result["sizes"]
    lines = [f"# FID extrapolated to infinitely many images (n = {result['n']}, {result['replicates']} paired "
             "bootstrap replicates)", "",
             f"| row | {' | '.join(f'FID_{s}' for s in sizes)} | FID_inf [95%] |",
             "|---|" + "---|" * (len(sizes) + 1)]
    for k, r in result["rows"].items():
        lo, hi = r["interval"]
        lines.append(f"| {k} | {' | '.join(f'{v:.2f}' for v in r['fid_by_size'])} | "
                     f"{r['fid_inf']:.2f} [{lo:.2f}, {hi:.2f}] |")
    lines += ["", f"| a - b | at N = {sizes[-1]} | FID_inf | a has the lower FID_inf |", "|---|---|---|---|"]
    for d in result["differences"]:
        (lo, hi), (nlo, nhi) = d["interval"], d["interval_at_n"]
        lines.append(f"| {d['a']} - {d['b']} | {d[f'fid_at_{sizes[-1]}']:+.2f} [{nlo:+.2f}, {nhi:+.2f}] | "
                     f"{d['fid_inf']:+.2f} [{lo:+.2f}, {hi:+.2f}] | **{d['verdict']}** |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", nargs="+", default=["ATG@1.5", "ATG@2", "CFG@3"], help="rows of benchmarks/effects.py")
    p.add_argument("--n", type=int, default=5000, help="images per row (the first n; every row must have them)")
    p.add_argument("--state", type=Path, default=Path("runs/effects/state"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/effects"))
    p.add_argument("--replicates", type=int, default=50)
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
