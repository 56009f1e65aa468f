"""Tables, plots and 95% verdicts from the rows the effects measurement has finished so far.

    python benchmarks/effects_report.py [--rows benchmarks/results/effects/rows.json] [--out benchmarks/results/effects]

    python benchmarks/effects_report.py --readme docs/effects.md   # also the effects page's tables, between its markers

Writes <out>/results.md, <out>/summary.json and, per N, <out>/accuracy_vs_fid_n<N>.png,
saturation_vs_w_n<N>.png and accuracy_vs_nfe_n<N>.png. Runs on any subset of rows: a
comparison whose rows have not both finished at a common N is left out, not guessed.

Every verdict is about a stated direction of effect: "confirmed" when the 95% interval of the
difference lies on that side of zero, "refuted" when it lies on the other side, "undecided"
otherwise; "identical images" when an adaptive row made exactly the images of the static row at
its NFE (intervals: `effects_stats.py`; accuracy differences by Newcombe's interval, which is
conservative for these same-seed rows; FID / saturation / precision differences by the paired
bootstrap; FID at matched accuracy by a joint bootstrap, `matched_accuracy_verdict`). Many
comparisons are made, each at 95%: about one in twenty undecided-in-truth comparisons may show as
decided by chance; the table lists all of them, not a chosen few.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages, not an installed copy

from effects_stats import (binomial_draws, centred_percentile_interval,  # noqa: E402
                           interpolated_proportion_difference, newcombe, normal_interval, read_line, verdict,
                           wilson)

HIGH_SCALES = (10.0, 15.0)
APG_SCALES = (1.5, 3.0, 5.0, 7.5, 10.0, 15.0)
ADAPTIVE = ("AG x0 0.995@3", "AG x0 0.990@3", "AG eps 0.995@3", "LinearAG@3")
STATIC = ("Interval 0-0.05@3", "Interval 0-0.1@3", "Interval 0-0.2@3", "Interval 0-0.25@3", "Interval 0-0.4@3",
          "Interval 0-0.6@3", "CFG@3")
AGAINST_CURVE = ("EluCD 0.05@3", "EluCD 0.02@3", "GFCG 2 + CFG@3", "GFCG 4 + CFG@3", "GFCG 4 alone@3",
                 "DynamicCFG alignment@3", "DynamicCFG default@3", "DynamicCFG signed weights@3",
                 "DynamicCFG fixed weights@3")
DYNAMIC = ("DynamicCFG alignment@3", "DynamicCFG default@3", "DynamicCFG signed weights@3",
           "DynamicCFG fixed weights@3")
FIELD_RULES = ("DynamicThresholding@10", "CFG-Zero*@3", "TCFG@3", "MAMBO-G@10", "APG-Mix@10", "FDG 10,5@3",
               "MimicScale 3@10")  # (f) issue #29, the rules of diffusers' guiders, ComfyUI and WebUI
PERTURBED_RULES = ("PAG 3@3",)  # (p) issue #30, guidance from a perturbed denoiser
AUTOGUIDANCE = ("ATG@1.5", "ATG@2", "ATG@3", "GFCG 2 + ATG@2")  # (e) issue #18, the embedded guide model
OLD_GUIDE = " (700-step guide)"  # rows made with the guide shipped before the 1,760-step one
AUTOGUIDANCE_OLD = tuple(k.replace("ATG@", f"ATG{OLD_GUIDE}@") for k in AUTOGUIDANCE)


class Rows:
    """Finished rows indexed by (key, N)."""

    def __init__(self, rows: list[dict]):
        rows = [{**r, "num_images": int(r["num_images"])} for r in rows]  # early rows stored it as a float
        self.by = {(r["key"], r["num_images"]): r for r in rows}

    def get(self, key: str, n: int) -> dict | None:
        return self.by.get((key, n))

    def sizes(self) -> list[int]:
        return sorted({n for _, n in self.by})

    def keys_at(self, n: int) -> list[str]:
        return [k for k, m in self.by if m == n]

    def common_n(self, *keys: str) -> int | None:
        """The largest N at which every key has finished."""
        common = [n for n in self.sizes() if all((k, n) in self.by for k in keys)]
        return common[-1] if common else None

    def cfg_curve(self, n: int) -> list[dict]:
        """CFG at every finished scale (the unguided row is CFG at w = 1), by scale."""
        rows = [r for (k, m), r in self.by.items() if m == n and (r["label"] == "CFG" or k == "unguided@1")]
        return sorted(rows, key=lambda r: r["scale"])

    def with_cfg_curve(self, key: str) -> tuple[dict, list[dict]] | None:
        """(row, CFG curve) at the largest N where the row and at least 3 CFG scales have finished."""
        for n in reversed(self.sizes()):
            row, curve = self.get(key, n), self.cfg_curve(n)
            if row is not None and len(curve) >= 3:
                return row, curve
        return None


def summary(row: dict) -> dict:
    """A row's numbers with their 95% intervals (no replicates)."""
    n = row["num_images"]
    out = {k: row[k] for k in ("key", "group", "label", "scale", "num_images", "nfe_per_image", "seconds_per_image",
                               "class_accuracy", "fid", "saturation_mean", "precision", "recall") if k in row}
    out["class_accuracy_ci"] = wilson(row["class_correct"], n)
    for metric in ("fid", "saturation_mean", "precision"):
        if metric in row.get("boot", {}):
            out[f"{metric}_ci"] = normal_interval(row[metric], row["boot"][metric])
    if row.get("recall_reference_n"):  # recall is a share of the reference points
        m = row["recall_reference_n"]
        out["recall_ci"] = wilson(round(row["recall"] * m), m)
    return out


def difference(a: dict, b: dict, metric: str) -> tuple[float, tuple[float, float]]:
    """a - b with its 95% interval; both rows at the same N."""
    if a["num_images"] != b["num_images"]:
        raise ValueError(f"rows {a['key']} (N={a['num_images']}) and {b['key']} (N={b['num_images']}) differ in N")
    if metric == "class_accuracy":
        n = a["num_images"]
        return a[metric] - b[metric], newcombe(a["class_correct"], n, b["class_correct"], n)
    if metric == "recall":  # a share of the same reference points for both rows: Newcombe over them
        m = a["recall_reference_n"]
        if m != b["recall_reference_n"]:
            raise ValueError(f"rows {a['key']} and {b['key']} measure recall on different reference sets")
        return a[metric] - b[metric], newcombe(round(a[metric] * m), m, round(b[metric] * m), m)
    ra, rb = np.asarray(a["boot"][metric]), np.asarray(b["boot"][metric])
    if len(ra) != len(rb):
        raise ValueError(f"rows {a['key']} and {b['key']} have different bootstrap replicate counts")
    estimate = a[metric] - b[metric]
    return estimate, normal_interval(estimate, ra - rb)


def claim(question: str, text: str, a: dict, b: dict, metric: str, sign: int) -> dict:
    estimate, interval = difference(a, b, metric)
    return {"question": question, "claim": text, "a": a["key"], "b": b["key"], "metric": metric,
            "num_images": a["num_images"], "difference": estimate, "interval": list(interval),
            "verdict": verdict(interval, sign)}


def dominates(a: dict, b: dict) -> bool:
    """a has higher class accuracy and lower FID than b, both at 95%."""
    return difference(a, b, "class_accuracy")[1][0] > 0 and difference(a, b, "fid")[1][1] < 0


def curve_verdict(rows: Rows, key: str, question: str) -> dict | None:
    """Is the row above the CFG curve? confirmed: it dominates some CFG scale and none dominates it;
    refuted: some CFG scale dominates it; undecided otherwise. At the largest N with >= 3 CFG scales.
    Only CFG points on the curve's frontier count as beaten: dominating a point that another CFG scale
    already beats on both axes (e.g. the unguided row, w = 1, against w = 3) says nothing about the curve."""
    found = rows.with_cfg_curve(key)
    if found is None:
        return None
    row, curve = found
    frontier = [c for c in curve if not any(o is not c and o["class_accuracy"] >= c["class_accuracy"]
                                            and o["fid"] <= c["fid"] for o in curve)]
    beats = [c["key"] for c in frontier if dominates(row, c)]
    beaten_by = [c["key"] for c in curve if dominates(c, row)]
    result = "refuted" if beaten_by else "confirmed" if beats else "undecided"
    return {"question": question, "claim": f"{key} lies above the CFG curve (accuracy vs FID)", "a": key,
            "b": "CFG curve: " + ", ".join(c["key"] for c in curve), "metric": "class_accuracy & fid",
            "num_images": row["num_images"], "dominates": beats, "dominated_by": beaten_by, "verdict": result}


def rising_curve(curve: list[dict]) -> list[dict]:
    """The CFG points by scale (unguided first) up to where class accuracy stops rising: along it each
    accuracy is reached by one scale, so "CFG at the same accuracy" is a point of this curve."""
    out = []
    for r in sorted(curve, key=lambda r: r["scale"]):
        if out and r["class_accuracy"] <= out[-1]["class_accuracy"]:
            break
        out.append(r)
    return out


def fid_at_accuracy(curve: list[dict], accuracy: float) -> tuple[float, np.ndarray, tuple[dict, dict], float]:
    """FID of a curve (sorted by rising accuracy) at `accuracy`, linear between the two points around it
    (or the nearest two), and per paired bootstrap replicate; with those two points and the weight of the
    second (outside [0, 1]: extrapolated)."""
    i = min(max(sum(r["class_accuracy"] < accuracy for r in curve), 1), len(curve) - 1)
    lo, hi = curve[i - 1], curve[i]
    w = (accuracy - lo["class_accuracy"]) / (hi["class_accuracy"] - lo["class_accuracy"])
    return *interpolated_fid(lo, hi, w), (lo, hi), w


def interpolated_fid(lo: dict, hi: dict, w: float) -> tuple[float, np.ndarray]:
    """FID at weight w on the straight line from row lo to row hi, and per paired bootstrap replicate."""
    replicates = (1 - w) * np.asarray(lo["boot"]["fid"]) + w * np.asarray(hi["boot"]["fid"])
    return lo["fid"] + w * (hi["fid"] - lo["fid"]), replicates


ACCURACY_DRAWS = 4000  # joint replicates; FID's 200 stored replicates are cycled (paired across rows by index)


def best_cfg_fid(accuracy: np.ndarray, fid: np.ndarray, at: float) -> float:
    """The lowest FID CFG reaches at class accuracy `at` or above: the curve read at `at` (straight between
    neighbouring scales, points sorted by accuracy), or a measured scale with more accuracy and a lower FID.
    Below CFG's lowest-FID scale the curve's FID falls as accuracy rises (w = 1 to 3 here), so the straight
    piece there is a set of dominated settings: CFG@3 gives more accuracy at a lower FID than any of them."""
    above = fid[accuracy >= at]
    return min(read_line(accuracy, fid, at), float(above.min())) if above.size else read_line(accuracy, fid, at)


def matched_accuracy_verdict(rows: Rows, key: str, question: str) -> dict | None:
    """Does the row have a lower FID than CFG at its class accuracy? CFG's FID there is `best_cfg_fid`: the
    curve read at the row's accuracy, or a scale with more accuracy at a lower FID. Both axes are uncertain,
    the curve's points too, so the interval is a joint bootstrap: in replicate b every row's FID is its paired
    bootstrap replicate and every row's accuracy a binomial draw around its own, independent across rows
    (conservative for same-seed rows, like Newcombe's; a row's FID and accuracy replicates are independent
    too, as rows keep one count of correct images, not which), and the replicate curve is read at the row's
    replicate accuracy. The reading divides by a difference of accuracies, so the replicates are skewed: a
    centred percentile interval. Asked at the largest N where the row's 95% accuracy interval lies within the
    rising CFG curve (no extrapolation)."""
    for n in reversed(rows.sizes()):
        row, curve = rows.get(key, n), rising_curve(rows.cfg_curve(n))
        if row is None or len(curve) < 2:
            continue
        low, high = wilson(row["class_correct"], n)
        if low < curve[0]["class_accuracy"] or high > curve[-1]["class_accuracy"]:
            continue
        accuracy = np.array([c["class_accuracy"] for c in curve])
        cfg_fid = best_cfg_fid(accuracy, np.array([c["fid"] for c in curve]), row["class_accuracy"])
        estimate = row["fid"] - cfg_fid
        drawn = np.stack([binomial_draws(c["class_correct"], n, ACCURACY_DRAWS, c["key"]) for c in curve])
        cycle = np.arange(ACCURACY_DRAWS) % len(row["boot"]["fid"])
        fids = np.stack([np.asarray(c["boot"]["fid"])[cycle] for c in curve])
        row_accuracy = binomial_draws(row["class_correct"], n, ACCURACY_DRAWS, key)
        row_fid = np.asarray(row["boot"]["fid"])[cycle]
        replicates = []
        for b in range(ACCURACY_DRAWS):
            order = np.argsort(drawn[:, b], kind="stable")
            replicates.append(row_fid[b] - best_cfg_fid(drawn[order, b], fids[order, b], row_accuracy[b]))
        interval = centred_percentile_interval(estimate, replicates)
        return {"question": question, "claim": f"{key} has lower FID than CFG at the same class accuracy",
                "a": key, "b": "CFG curve: " + ", ".join(c["key"] for c in curve), "metric": "fid",
                "num_images": n, "difference": estimate, "cfg_fid": cfg_fid, "interval": list(interval),
                "verdict": verdict(interval, -1)}
    return None


def same_images(a: dict, b: dict) -> bool:
    """Two rows made the same images: FID to the last digit, every bootstrap replicate and the accuracy agree
    (the features of different images would not give 200 equal FIDs)."""
    return a["fid"] == b["fid"] and a["class_correct"] == b["class_correct"] and a["boot"]["fid"] == b["boot"]["fid"]


def static_curve(rows: Rows, n: int) -> list[dict]:
    """Static truncation at w = 3 by NFE: CFG on the first 0% (the unguided row, 20 NFE), 5, 10, 20, 25, 40,
    60% and 100% (CFG@3, 40 NFE) of the steps; the same seeds throughout."""
    found = [rows.get(k, n) for k in ("unguided@1",) + STATIC]
    return sorted([r for r in found if r is not None], key=lambda r: r["nfe_per_image"])


def matched_nfe_claims(rows: Rows, key: str) -> list[dict]:
    """Does the adaptive row beat static truncation at its own NFE? Static class accuracy and FID are
    interpolated linearly in NFE between the two static rows around it (accuracy: a conservative normal
    interval; FID: paired bootstrap). At the largest N where static rows bracket the row's NFE."""
    for n in reversed(rows.sizes()):
        row, curve = rows.get(key, n), static_curve(rows, n)
        if row is None:
            continue
        nfe = row["nfe_per_image"]
        below = [c for c in curve if c["nfe_per_image"] <= nfe + 1e-9]
        above = [c for c in curve if c["nfe_per_image"] >= nfe - 1e-9]
        if not below or not above:
            continue
        lo, hi = below[-1], above[0]
        span = hi["nfe_per_image"] - lo["nfe_per_image"]
        w = 0.0 if span == 0 else (nfe - lo["nfe_per_image"]) / span
        accuracy, accuracy_interval = interpolated_proportion_difference(
            row["class_correct"], lo["class_correct"], hi["class_correct"], w, n)
        static_fid, replicates = interpolated_fid(lo, hi, w)
        fid = row["fid"] - static_fid
        fid_interval = normal_interval(fid, np.asarray(row["boot"]["fid"]) - replicates)
        same = span == 0 and same_images(row, lo)  # e.g. AG stopping after the first step every time
        if same:
            accuracy_interval = fid_interval = (0.0, 0.0)
        static = lo["key"] if span == 0 else (f"between {lo['key']} ({lo['nfe_per_image']:.0f} NFE) and "
                                               f"{hi['key']} ({hi['nfe_per_image']:.0f} NFE)")
        base = {"question": "b", "a": key, "b": f"static truncation at {nfe:.1f} NFE: {static}", "num_images": n}
        return [{**base, "claim": f"{key} ({nfe:.1f} NFE) has higher class accuracy than static truncation at "
                                  "the same NFE", "metric": "class_accuracy", "difference": accuracy,
                 "interval": list(accuracy_interval), "verdict": verdict(accuracy_interval, +1, same)},
                {**base, "claim": f"{key} ({nfe:.1f} NFE) has lower FID than static truncation at the same NFE",
                 "metric": "fid", "difference": fid, "interval": list(fid_interval),
                 "verdict": verdict(fid_interval, -1, same)}]
    return []


def conclusions(rows: Rows) -> list[dict]:
    out = []

    def pair(question, text, key_a, key_b, metric, sign):
        n = rows.common_n(key_a, key_b)
        if n is not None:
            out.append(claim(question, text, rows.get(key_a, n), rows.get(key_b, n), metric, sign))

    # (a) APG (Sadat et al.): at high scales less saturation, better FID and recall, precision kept
    for w in HIGH_SCALES:
        pair("a", f"CFG oversaturates: saturation at w={w:g} above w=3", f"CFG@{w:g}", "CFG@3", "saturation_mean", +1)
    for w in APG_SCALES:
        a, b = f"APG@{w:g}", f"CFG@{w:g}"
        pair("a", f"APG lowers saturation against CFG at w={w:g}", a, b, "saturation_mean", -1)
        pair("a", f"APG lowers FID against CFG at w={w:g}", a, b, "fid", -1)
        pair("a", f"APG loses class accuracy against CFG at w={w:g}", a, b, "class_accuracy", -1)
        pair("a", f"APG loses precision against CFG at w={w:g}", a, b, "precision", -1)
        pair("a", f"APG raises recall against CFG at w={w:g}", a, b, "recall", +1)
    for label in ("APG r=5", "APG r=1"):
        pair("a", f"{label} lowers FID against CFG at w=10", f"{label}@10", "CFG@10", "fid", -1)
        pair("a", f"{label} loses class accuracy against CFG at w=10", f"{label}@10", "CFG@10", "class_accuracy", -1)
    # (b) adaptive against static truncation at the same NFE (AG's paper: same quality for fewer NFEs)
    for key in ADAPTIVE:
        out.extend(matched_nfe_claims(rows, key))
        pair("b", f"{key} loses class accuracy against full CFG@3", key, "CFG@3", "class_accuracy", -1)
    # (a) APG's headline: better FID at comparable accuracy is a point above the CFG curve; (c), (d)
    apg = tuple(f"APG@{w:g}" for w in APG_SCALES) + ("APG r=5@10", "APG r=1@10")
    for key in apg + AGAINST_CURVE + AUTOGUIDANCE + AUTOGUIDANCE_OLD:
        group = "a" if key in apg else "d" if key in DYNAMIC else "e" if key in AUTOGUIDANCE + AUTOGUIDANCE_OLD else "c"
        for judge in (curve_verdict, matched_accuracy_verdict):
            result = judge(rows, key, group)
            if result:
                out.append(result)
    # (f) the field's rules (#29): above the CFG curve, and their saturation against CFG at the same scale
    for group, keys in (("f", FIELD_RULES), ("p", PERTURBED_RULES)):
        for key in keys:
            for judge in (curve_verdict, matched_accuracy_verdict):
                if result := judge(rows, key, group):
                    out.append(result)
            cfg = f"CFG@{key.rsplit('@', 1)[1]}"
            pair(group, f"{key} lowers saturation against {cfg}", key, cfg, "saturation_mean", -1)
            pair(group, f"{key} lowers FID against {cfg}", key, cfg, "fid", -1)
    # (e) the GFCG paper's headline setting: GFCG's push on top of autoguidance raises class accuracy
    for guide in ("", OLD_GUIDE):
        atg, both = f"ATG{guide}@2", f"GFCG 2 + ATG{guide}@2"
        pair("e", f"{both} raises class accuracy over {atg} alone", both, atg, "class_accuracy", +1)
        pair("e", f"{both} has lower FID than {atg} alone", both, atg, "fid", -1)
    # (e) the autoguidance paper compares each method at its best scale: here, against CFG's lowest FID
    # the scale is chosen on the curve; the two are then compared at the largest N both reached (5,000 here)
    for key in AUTOGUIDANCE:
        if found := rows.with_cfg_curve(key):
            best = min(found[1], key=lambda r: r["fid"])["key"]
            pair("e", f"{key} has lower FID than CFG's lowest-FID scale ({best})", key, best, "fid", -1)
    # (e) the guide's training length: the shipped 1,760-step guide against the 700-step one it replaced
    for w in ("1.5", "2"):
        new, old = f"ATG@{w}", f"ATG{OLD_GUIDE}@{w}"
        pair("e", f"{new} (1,760-step guide) has lower FID than {old}", new, old, "fid", -1)
        pair("e", f"{new} (1,760-step guide) has higher class accuracy than {old}", new, old, "class_accuracy", +1)
    # (d) issue #7: Dynamic CFG above the best fixed scale's class accuracy
    for key in DYNAMIC:
        if found := rows.with_cfg_curve(key):
            row, curve = found
            best = max(curve, key=lambda r: r["class_accuracy"])
            out.append(claim("d", f"{key} has higher class accuracy than the best fixed CFG scale ({best['key']})",
                             row, best, "class_accuracy", +1))
            # FID against the top of CFG's accuracy at its best: among the scales whose accuracy is not below
            # the best one's at 95%, the lowest FID (the best-accuracy scale alone can be a far worse point,
            # e.g. w = 15 against w = 10 here)
            top = min((c for c in curve if c is best or difference(c, best, "class_accuracy")[1][1] >= 0),
                      key=lambda r: r["fid"])
            out.append(claim("d", f"{key} has lower FID than CFG at the top of its accuracy ({top['key']})",
                             row, top, "fid", -1))
    return out


def _ci(value: float, interval, fmt: str) -> str:
    return f"{fmt.format(value)} [{fmt.format(interval[0])}, {fmt.format(interval[1])}]"


def interval_p_value(estimate: float, interval: tuple[float, float]) -> float:
    """The two-sided p-value of "no difference" that a 95% interval implies: its half-width on the side of zero
    read as 1.96 standard errors (p < 0.05 exactly when the interval excludes 0, for the Newcombe and percentile
    intervals too)."""
    low, high = interval
    half = (estimate - low) if estimate >= 0 else (high - estimate)
    if half <= 0:
        return 0.0 if estimate != 0 else 1.0
    return math.erfc(abs(estimate) / (half / 1.96) / math.sqrt(2))


def holm(found: list[dict], alpha: float = 0.05) -> None:
    """Holm's step-down adjustment over every claim with a difference interval (the family of the whole table):
    sets c["holm"] to the verdict that survives it (a confirmed or refuted claim whose hypothesis Holm does not
    reject becomes undecided). The curve verdicts (dominance of CFG points) have no single p-value: "-"."""
    family = [c for c in found if "interval" in c and c["verdict"] != "identical images"]
    ranked = sorted(family, key=lambda c: interval_p_value(c["difference"], c["interval"]))
    rejecting = True
    for i, c in enumerate(ranked):
        rejecting = rejecting and interval_p_value(c["difference"], c["interval"]) <= alpha / (len(ranked) - i)
        c["holm"] = c["verdict"] if rejecting else "undecided"
    for c in found:
        c.setdefault("holm", c["verdict"] if c["verdict"] == "identical images" else "-")


def verdict_table(found: list[dict]) -> list[str]:
    holm(found)
    lines = [f"| | claim | N | difference (a - b) [95%] | verdict | Holm-adjusted ({sum(c['holm'] != '-' for c in found)} "
             "claims) |", "|---|---|---|---|---|---|"]
    for c in found:
        if "difference" in c:
            fmt = "{:+.3f}" if c["metric"] != "fid" else "{:+.2f}"
            diff = f"{c['metric']}: " + _ci(c["difference"], c["interval"], fmt)
        else:
            diff = (f"dominates {', '.join(c['dominates']) or 'none'}; dominated by "
                    f"{', '.join(c['dominated_by']) or 'none'}")
        lines.append(f"| {c['question']} | {c['claim']} | {c['num_images']} | {diff} | **{c['verdict']}** | "
                     f"{c['holm']} |")
    return lines


def rows_table(rows: Rows, n: int) -> list[str]:
    lines = ["| group | setting | NFE (every model evaluation) | class accuracy | FID | saturation | precision | recall "
             "| s/img |", "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(rows.keys_at(n), key=_order):
        row = rows.get(key, n)
        s = summary(row)
        # the guide model's and the perturbed denoiser's rows count as evaluations too
        guide, perturbed = (float(row.get(f"{k}_nfe_per_image", 0.0)) for k in ("guide", "perturbed"))
        nfe = (f"{s['nfe_per_image'] + guide + perturbed:.1f}" + (f" ({guide:.0f} of the guide model)" if guide else "")
               + (f" ({perturbed:.0f} perturbed)" if perturbed else ""))
        cells = [s["group"], key, nfe,
                 _ci(s["class_accuracy"], s["class_accuracy_ci"], "{:.3f}"),
                 _ci(s["fid"], s["fid_ci"], "{:.1f}") if "fid_ci" in s else "-",
                 _ci(s["saturation_mean"], s["saturation_mean_ci"], "{:.4f}") if "saturation_mean_ci" in s else "-",
                 _ci(s["precision"], s["precision_ci"], "{:.3f}") if "precision_ci" in s else "-",
                 _ci(s["recall"], s["recall_ci"], "{:.3f}") if "recall_ci" in s else "-",
                 f"{s['seconds_per_image']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(rows: Rows, found: list[dict], meta: dict) -> str:
    lines = ["# Effects of the guidance methods on the embedded CIFAR-10 model (issue #17)", "",
             f"DDIM {meta.get('steps', 20)} steps, FID against {meta.get('reference', 'cifar10-train')}, class "
             "accuracy by the evaluation classifier, mean HSV saturation, precision / recall (k = 3, the 1,000 "
             "shipped reference features). Every number: estimate [95% interval]; accuracy Wilson, recall "
             "Wilson over the reference points, FID / saturation / precision +-1.96 bootstrap standard errors "
             "over images (FID of N images: compare rows at equal N only). Same seeds in every row.",
             "", "Produced by `python benchmarks/effects.py` (resumable) and "
             "`python benchmarks/effects_report.py`.", ""]
    lines += ["## Verdicts at 95%", "", *verdict_table(found)]
    for n in rows.sizes():
        lines += ["", f"## Rows at N = {n}", "", *rows_table(rows, n)]
    return "\n".join(lines) + "\n"


README_START, README_END = "<!-- effects:start -->", "<!-- effects:end -->"


def readme_block(rows: Rows, found: list[dict]) -> str:
    """The verdicts and the rows of every N, largest N first: what the README shows between its markers."""
    lines = [README_START, "", "Verdicts (generated by `benchmarks/effects_report.py --readme docs/effects.md`; group a: "
             "CFG / APG, b: adaptive vs static truncation, c: classifier-based, d: Dynamic CFG, e: autoguidance, "
             "f: the field's rules (CFG-Zero*, TCFG, MAMBO-G, APG-Mix, FDG, dynamic thresholding); "
             "each at the largest N where both sides have finished):", "", *verdict_table(found)]
    for n in reversed(rows.sizes()):
        lines += ["", f"Rows at N = {n:,}:", "", *rows_table(rows, n)]
    return "\n".join(lines + ["", README_END])


def write_readme(path: Path, rows: Rows, found: list[dict]) -> None:
    """Replace the text between the effects markers of `path`; the prose around them is written by hand."""
    text = path.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if not (text.count(README_START) == text.count(README_END) == 1 and start < end):
        raise ValueError(f"--readme {path}: needs one {README_START} line followed by one {README_END} line")
    head, rest = text.split(README_START)
    path.write_text(head + readme_block(rows, found) + rest.split(README_END, 1)[1])


def _order(key: str) -> tuple:
    label, scale = key.rsplit("@", 1)
    return (label != "unguided", label != "CFG", label != "APG", label, float(scale))


GROUP_MARKERS = {"a": "o", "b": "s", "c": "^", "d": "D", "e": "v"}


def plots(rows: Rows, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for n in rows.sizes():
        summaries = {k: summary(rows.get(k, n)) for k in rows.keys_at(n)}
        curves = {label: sorted((s for s in summaries.values() if s["label"] == label or
                                 (label == "CFG" and s["key"] == "unguided@1")), key=lambda s: s["scale"])
                  for label in ("CFG", "APG")}

        def bars(items, name):  # (2, len) distances to the interval ends; None for exact quantities
            if f"{name}_ci" not in items[0]:
                return None
            return np.array([[s[name] - s[f"{name}_ci"][0], s[f"{name}_ci"][1] - s[name]] for s in items]).T

        def errorbar(ax, items, x, y, **kw):
            ax.errorbar([s[x] for s in items], [s[y] for s in items], xerr=bars(items, x), yerr=bars(items, y),
                        capsize=2, **kw)

        fig, ax = plt.subplots(figsize=(7, 5))
        for label, items in curves.items():
            if items:
                errorbar(ax, items, "fid", "class_accuracy", marker="o", label=label)
                for s in items:
                    ax.annotate(f"w={s['scale']:g}", (s["fid"], s["class_accuracy"]), fontsize=7)
        static = [summaries[r["key"]] for r in static_curve(rows, n)]  # already summarised above
        if len(static) > 2:  # unguided, CFG@3 and at least one truncation between them
            errorbar(ax, static, "fid", "class_accuracy", marker=".", linestyle=":", color="grey",
                     label="static truncation (w = 3, unguided to CFG@3)")
        others = [s for s in summaries.values() if s["label"] not in ("CFG", "APG") and s["key"] != "unguided@1"
                  and s["key"] not in STATIC]
        colours = plt.get_cmap("tab20").colors[4:]  # after the first two pairs: CFG's and APG's default colours
        for i, s in enumerate(others):  # one colour each, one marker per question group
            errorbar(ax, [s], "fid", "class_accuracy", marker=GROUP_MARKERS.get(s["group"], "s"), linestyle="none",
                     color=colours[i % len(colours)], label=s["key"])
        ax.set(xlabel=f"FID (N = {n}, CIFAR-10 train)", ylabel="class accuracy",
               title="accuracy vs FID (95% intervals)")
        ax.legend(fontsize=6)
        written.append(out / f"accuracy_vs_fid_n{n}.png")
        fig.tight_layout(), fig.savefig(written[-1], dpi=110), plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 4))
        for label, items in curves.items():
            if items:
                errorbar(ax, items, "scale", "saturation_mean", marker="o", label=label)
        ax.set(xlabel="guidance scale w", ylabel="mean HSV saturation", title=f"saturation vs w (N = {n})")
        ax.legend()
        written.append(out / f"saturation_vs_w_n{n}.png")
        fig.tight_layout(), fig.savefig(written[-1], dpi=110), plt.close(fig)

        nfe_rows = [s for k, s in summaries.items() if k in ADAPTIVE + STATIC or k == "unguided@1"]
        if nfe_rows:
            fig, ax = plt.subplots(figsize=(6, 4))
            static = sorted((s for s in nfe_rows if s["key"] in STATIC or s["key"] == "unguided@1"),
                            key=lambda s: s["nfe_per_image"])
            if static:
                errorbar(ax, static, "nfe_per_image", "class_accuracy", marker="o", label="static truncation / CFG@3")
            for s in nfe_rows:
                if s["key"] in ADAPTIVE:
                    errorbar(ax, [s], "nfe_per_image", "class_accuracy", marker="s", linestyle="none", label=s["key"])
            ax.set(xlabel="NFE per image", ylabel="class accuracy", title=f"accuracy vs NFE at w = 3 (N = {n})")
            ax.legend(fontsize=7)
            written.append(out / f"accuracy_vs_nfe_n{n}.png")
            fig.tight_layout(), fig.savefig(written[-1], dpi=110), plt.close(fig)
    return written


def report(rows_path: Path, out: Path, draw: bool = True, readme: Path | None = None) -> dict:
    data = json.loads(rows_path.read_text())
    rows = Rows(data["rows"])
    found = conclusions(rows)
    if readme is not None:
        write_readme(readme, rows, found)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown(rows, found, data.get("meta", {})))
    result = {"meta": data.get("meta", {}), "rows": [summary(r) for r in rows.by.values()], "conclusions": found}
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    if draw:
        plots(rows, out)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=Path, default=Path("benchmarks/results/effects/rows.json"))
    p.add_argument("--out", type=Path, default=None, help="default: the folder of --rows")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--readme", type=Path, default=None,
                   help=f"also replace the tables between {README_START} and {README_END} in this file")
    args = p.parse_args(argv)
    result = report(args.rows, args.out or args.rows.parent, draw=not args.no_plots, readme=args.readme)
    for c in result["conclusions"]:
        print(f"[{c['verdict']:>9}] N={c['num_images']}: {c['claim']}")


if __name__ == "__main__":
    main()
