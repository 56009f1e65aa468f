"""EluCD's step rule on the embedded model: the x0 rule (our default) against the authors' x_t rule
(issue #15, build item 5), each at three scales so their accuracy-vs-FID curves can be compared.

    OMP_NUM_THREADS=1 nohup nice -n 5 python benchmarks/elucd_step_rule.py run --threads 1 \
        >> runs/elucd_step_rule.log 2>&1 &
    python benchmarks/elucd_step_rule.py report

`run` is `effects.py`'s resumable machinery with this plan (same seeds, classes i % 10, DDIM 20 steps,
FID against cifar10-train, class accuracy by the evaluation classifier, bootstrap replicates paired
across rows); `report` writes results.md and summary.json next to rows.json. Every row is CFG at
w = 3 underneath (the paper's DiT setup) and differs only in `step_rule` and `scale`; the other
parameters are the class defaults (tau1 1, tau2 0.5, softplus 3, gamma 0.3, normalize).

The decision (made in `report`): at matched accuracy (Newcombe interval of the accuracy difference
containing 0), the x_t rule is worse if an x0 row has the lower FID at 95% (paired bootstrap), better
in the mirror case, no worse (undecided) otherwise. Dominance across scales is shown, not counted:
here FID falls as accuracy rises along either rule's curve, so a weak row of one rule is dominated by
a strong row of the other just as by a strong row of its own. `report` also compares each x_t row with
the x0 curve interpolated linearly at its accuracy (bootstrap over FID only, accuracies held fixed).
The x_t scales were picked by a 50-image class-accuracy probe to span the x0 rows' accuracy range.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, not an installed copy

import effects  # noqa: E402
from effects_report import Rows, difference, fid_at_accuracy, summary  # noqa: E402
from effects_stats import normal_interval  # noqa: E402

X0_SCALES = (0.01, 0.02, 0.05)
XT_SCALES = (0.003, 0.01, 0.02)
OUT = Path("benchmarks/results/elucd_step_rule")
STATE = Path("runs/elucd_step_rule")
N = 200


def plan(steps: int = effects.STEPS) -> list[dict]:
    from guidance import CFG, CalibratedClassifierGuidance

    def row(label, strategy, rule=None):
        return {"key": f"{label}@3", "group": rule or "cfg", "label": label, "scale": 3.0,
                "strategy": strategy.to_config()}

    rows = []
    for i in (1, 0, 2):  # pairs of about equal accuracy (probe), the middle one first; CFG, the anchor, last
        rows.append(row(f"EluCD x0 {X0_SCALES[i]:g}", CalibratedClassifierGuidance(
            "embedded-guidance", scale=X0_SCALES[i], step_rule="x0"), "x0"))
        rows.append(row(f"EluCD x_t {XT_SCALES[i]:g}", CalibratedClassifierGuidance(
            "embedded-guidance", scale=XT_SCALES[i], step_rule="x_t"), "x_t"))
    return rows + [row("CFG", CFG())]


def decide(rows: Rows, n: int) -> dict:
    """Every x0-row / x_t-row pair: accuracy and FID differences (x_t - x0) with 95% intervals."""
    x0 = [r for (k, m), r in rows.by.items() if m == n and r["group"] == "x0"]
    xt = [r for (k, m), r in rows.by.items() if m == n and r["group"] == "x_t"]
    pairs, worse, better = [], [], []
    for b in xt:
        for a in x0:
            d_acc, ci_acc = difference(b, a, "class_accuracy")
            d_fid, ci_fid = difference(b, a, "fid")
            matched = ci_acc[0] <= 0 <= ci_acc[1]
            pair = {"x_t": b["key"], "x0": a["key"], "accuracy_diff": d_acc, "accuracy_ci": list(ci_acc),
                    "fid_diff": d_fid, "fid_ci": list(ci_fid), "matched_accuracy": matched}
            pairs.append(pair)
            # At matched accuracy only: across scales FID falls as accuracy rises for either rule here, so
            # a weak row of one rule is dominated by a strong row of the other, as by its own rule's.
            if matched and ci_fid[0] > 0:
                worse.append(pair)
            if matched and ci_fid[1] < 0:
                better.append(pair)
    verdict = ("x_t worse" if worse and not better else "x_t better" if better and not worse
               else "mixed" if worse else "x_t no worse (undecided)")
    return {"num_images": n, "pairs": pairs, "x_t_worse_in": [(p["x_t"], p["x0"]) for p in worse],
            "x_t_better_in": [(p["x_t"], p["x0"]) for p in better], "verdict": verdict,
            "interpolated": interpolated(x0, xt)}


def interpolated(x0: list[dict], xt: list[dict]) -> list[dict]:
    """Each x_t row's FID minus the x0 curve's at the same accuracy (linear between the two x0 rows around
    it, or the nearest two), per paired bootstrap replicate; accuracies are held at their estimates."""
    curve = sorted(x0, key=lambda r: r["class_accuracy"])
    out = []
    for b in xt if len(curve) > 1 else ():
        x0_fid, replicates, (lo, hi), w = fid_at_accuracy(curve, b["class_accuracy"])
        est = b["fid"] - x0_fid
        out.append({"x_t": b["key"], "between": [lo["key"], hi["key"]], "weight": w, "fid_diff": est,
                    "fid_ci": list(normal_interval(est, np.asarray(b["boot"]["fid"]) - replicates)),
                    "extrapolated": not 0 <= w <= 1})
    return out


def _ci(value, ci, fmt):
    return f"{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def report(out: Path = OUT, n: int = N) -> dict:
    data = json.loads((out / "rows.json").read_text())
    rows = Rows(data["rows"])
    table = [summary(r) for (k, m), r in sorted(rows.by.items(), key=lambda kv: kv[1]["key"]) if m == n]
    result = {"meta": data.get("meta", {}), "rows": table, "decision": decide(rows, n)}
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    lines = [f"# EluCD step rule on the embedded model (N = {n} per row, 95% intervals)", "",
             "| row | class accuracy (Wilson) | FID vs cifar10-train (bootstrap) | s/img |", "|---|---|---|---|"]
    for s in table:
        lines.append(f"| {s['key']} | {_ci(s['class_accuracy'], s['class_accuracy_ci'], '.3f')} | "
                     f"{_ci(s['fid'], s['fid_ci'], '.2f')} | {s['seconds_per_image']:.2f} |")
    lines += ["", "x_t minus x0, every pair (accuracy: Newcombe; FID: paired bootstrap):", "",
              "| x_t row | x0 row | accuracy | FID | matched accuracy |", "|---|---|---|---|---|"]
    for p in result["decision"]["pairs"]:
        lines.append(f"| {p['x_t']} | {p['x0']} | {_ci(p['accuracy_diff'], p['accuracy_ci'], '+.3f')} | "
                     f"{_ci(p['fid_diff'], p['fid_ci'], '+.2f')} | {'yes' if p['matched_accuracy'] else 'no'} |")
    curve = sorted((r for (k, m), r in rows.by.items() if m == n and r["group"] == "x0"),
                   key=lambda r: r["strategy"]["params"]["scale"])
    if len(curve) > 1:  # the x0 curve's own steps: how FID moves with accuracy along it
        lines += ["", "Along the x0 curve (next scale minus previous):", "", "| x0 rows | accuracy | FID |",
                  "|---|---|---|"]
        for a, b in zip(curve, curve[1:]):
            d_acc, ci_acc = difference(b, a, "class_accuracy")
            d_fid, ci_fid = difference(b, a, "fid")
            lines.append(f"| {b['key']} - {a['key']} | {_ci(d_acc, ci_acc, '+.3f')} | {_ci(d_fid, ci_fid, '+.2f')} |")
    lines += ["", "x_t row minus the x0 curve interpolated at its accuracy (FID; accuracies held fixed):", "",
              "| x_t row | x0 rows | FID | |", "|---|---|---|---|"]
    for p in result["decision"]["interpolated"]:
        lines.append(f"| {p['x_t']} | {' .. '.join(p['between'])} | {_ci(p['fid_diff'], p['fid_ci'], '+.2f')} | "
                     f"{'extrapolated' if p['extrapolated'] else ''} |")
    lines += ["", f"Verdict (matched-accuracy pairs): **{result['decision']['verdict']}**", ""]
    (out / "results.md").write_text("\n".join(lines))
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("run", "report"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", nargs="*", default=None, help="row keys to run (default: the whole plan)")
    args = p.parse_args(argv)
    if args.command == "report":
        print(json.dumps(report()["decision"]["verdict"]))
        return
    forward = ["--stages", str(N), "--state", str(STATE), "--out", str(OUT), "--batch-size", "50"]
    forward += ["--threads", str(args.threads)] if args.threads else []
    forward += ["--only", *args.only] if args.only else []
    effects.main(forward, make_plan=plan)


if __name__ == "__main__":
    main()
