"""The interval code and verdicts of the effects measurement (benchmarks/effects_stats.py, effects_report.py)."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from effects_report import (Rows, conclusions, curve_verdict, difference, matched_accuracy_verdict,  # noqa: E402
                            report)
from effects_stats import (Z95, binomial_draws, bootstrap_counts, centred_percentile_interval,  # noqa: E402
                           interpolated_proportion_difference, newcombe, normal_interval, read_line, verdict,
                           weighted_fid, weighted_mean, wilson)

from evaluation.fid import frechet_distance  # noqa: E402


def test_wilson_and_newcombe_match_published_values():
    # Newcombe (1998), Statist. Med. 17:857, table I and table II (example 56/70 vs 48/80)
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert newcombe(56, 70, 48, 80) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    with pytest.raises(ValueError, match="successes=11, n=10"):
        wilson(11, 10)


@pytest.mark.parametrize("d", [8, 16])  # 12 images: the d x d form (d = 8) and the N x N form (d = 16)
def test_weighted_fid_equals_the_fid_of_the_repeated_features(d):
    g = torch.Generator().manual_seed(0)
    n = 12
    ref = torch.randn(40, d, generator=g, dtype=torch.float64)
    ref_mu, ref_sigma = ref.mean(0), torch.cov(ref.T)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.3 + 0.2
    counts = bootstrap_counts(n, 4)
    fids = weighted_fid(x, ref_mu, ref_sigma, torch.cat([torch.ones(1, n, dtype=torch.float64), counts]))

    def plain(features):
        return float(frechet_distance(ref_mu, ref_sigma, features.mean(0), torch.cov(features.T)))

    # rel 1e-6: square roots of rounding-level eigenvalues of the rank-deficient matrices
    assert float(fids[0]) == pytest.approx(plain(x), rel=1e-6)
    for fid, c in zip(fids[1:], counts):
        assert float(fid) == pytest.approx(plain(x.repeat_interleave(c.long(), dim=0)), rel=1e-6)


def test_bootstrap_counts_are_shared_by_rows_of_the_same_n():
    a, b = bootstrap_counts(30, 5), bootstrap_counts(30, 5)
    assert torch.equal(a, b) and (a.sum(1) == 30).all()
    assert not torch.equal(a[0], a[1])
    assert weighted_mean(torch.arange(30.0), torch.ones(1, 30)).item() == pytest.approx(14.5)


def test_normal_interval_and_verdict():
    low, high = normal_interval(1.0, [0.0, 2.0])  # sd sqrt(2)
    assert (low, high) == pytest.approx((1 - 1.96 * 2 ** 0.5, 1 + 1.96 * 2 ** 0.5), abs=1e-3)
    assert verdict((0.1, 0.3), +1) == "confirmed" and verdict((0.1, 0.3), -1) == "refuted"
    assert verdict((-0.1, 0.3), +1) == "undecided" and verdict((-0.3, -0.1), -1) == "confirmed"


def _row(key, n, acc, fid, sat, nfe=40.0, seed=0):
    """A synthetic finished row whose bootstrap replicates have a small spread around its values."""
    label, scale = key.rsplit("@", 1)
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 1, 200)  # shared by every row of the call: paired replicates
    return {"key": key, "label": label, "group": "a", "scale": float(scale), "num_images": n, "class_accuracy": acc,
            "class_correct": round(acc * n), "fid": fid, "saturation_mean": sat, "precision": 0.6, "recall": 0.5,
            "recall_reference_n": 1000, "nfe_per_image": nfe, "seconds_per_image": 1.0,
            "boot": {"fid": list(fid + 2.0 * noise), "saturation_mean": list(sat + 0.002 * noise),
                     "precision": list(0.6 + 0.01 * noise)}}


def test_recall_difference_is_newcombe_over_the_reference_points():
    a, b = _row("APG@10", 500, 0.8, 40.0, 0.35), _row("CFG@10", 500, 0.8, 45.0, 0.37)
    a["recall"], b["recall"] = 0.215, 0.104  # of 1,000 reference points: 215 and 104 covered
    estimate, interval = difference(a, b, "recall")
    assert estimate == pytest.approx(0.111) and interval == newcombe(215, 1000, 104, 1000)
    assert interval[0] > 0
    b["recall_reference_n"] = 500
    with pytest.raises(ValueError, match="different reference sets"):
        difference(a, b, "recall")


def test_interpolated_proportion_difference():
    # 225/500 against halfway between 125/500 and 250/500 (0.375): +0.075, variance of three independent terms
    estimate, (low, high) = interpolated_proportion_difference(225, 125, 250, 0.5, 500)
    se = ((0.45 * 0.55 + 0.25 * 0.25 * 0.75 + 0.25 * 0.5 * 0.5) / 500) ** 0.5
    assert estimate == pytest.approx(0.075) and (low, high) == pytest.approx((0.075 - Z95 * se, 0.075 + Z95 * se))
    assert interpolated_proportion_difference(225, 125, 250, 0.0, 500)[0] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="weight=1.5"):
        interpolated_proportion_difference(225, 125, 250, 1.5, 500)


def test_joint_bootstrap_pieces():
    x, y = np.array([0.2, 0.4, 0.8]), np.array([10.0, 20.0, 60.0])
    assert read_line(x, y, 0.3) == pytest.approx(15.0) and read_line(x, y, 0.6) == pytest.approx(40.0)
    assert read_line(x, y, 1.0) == pytest.approx(80.0) and read_line(x, y, 0.1) == pytest.approx(5.0)  # straight on
    assert read_line(np.array([0.2, 0.2, 0.8]), y, 0.2) == pytest.approx(15.0)  # a vertical piece: its middle
    draws = binomial_draws(300, 500, 4000, "CFG@3")
    assert draws.mean() == pytest.approx(0.6, abs=0.002)
    assert draws.std() == pytest.approx((0.24 / 500) ** 0.5, rel=0.05)
    assert np.array_equal(draws, binomial_draws(300, 500, 4000, "CFG@3"))  # seeded by the key: reports regenerate
    assert not np.array_equal(draws, binomial_draws(300, 500, 4000, "CFG@5"))
    skewed = np.concatenate([np.zeros(90), np.full(10, 10.0)])  # median 0, 97.5th percentile 10
    assert centred_percentile_interval(1.0, skewed) == pytest.approx((1.0, 11.0))


def _matched(n, acc, fid, cfg_accuracies=(0.25, 0.65, 0.85), cfg_fids=(40.0, 30.0, 45.0)):
    curve = [_row(f"CFG@{w}", n, a, f, 0.38) for w, a, f in zip((1.5, 3, 10), cfg_accuracies, cfg_fids)]
    return matched_accuracy_verdict(Rows(curve + [_row("APG@5", n, acc, fid, 0.35)]), "APG@5", "a")


def test_matched_accuracy_interval_carries_the_accuracy_of_every_row():
    """CFG's FID at the row's accuracy is uncertain through the row's accuracy and the curve's own points:
    the same FID gap is decided at N = 2,000 and not at N = 200, where accuracies are 3x less certain,
    although the FID replicates are the same."""
    large, small = _matched(2000, 0.75, 34.5), _matched(200, 0.75, 34.5)  # CFG at 0.75: FID 37.5
    assert large["difference"] == small["difference"] == pytest.approx(-3.0)
    assert large["verdict"] == "confirmed" and small["verdict"] == "undecided"
    assert small["interval"][1] - small["interval"][0] > 2 * (large["interval"][1] - large["interval"][0])
    # a gap of 1.6: 1.96 standard errors of the row's accuracy alone (0.0097, times the slope 75) would
    # decide it; with the uncertain accuracies of CFG@3 and CFG@10 it is not
    assert _matched(2000, 0.75, 35.9)["verdict"] == "undecided"
    # on a steep piece of the curve (FID 30 -> 70 between accuracy 0.65 and 0.85) the same gap is undecided
    steep = _matched(2000, 0.75, 47.0, cfg_fids=(40.0, 30.0, 70.0))
    assert steep["difference"] == pytest.approx(-3.0) and steep["verdict"] == "undecided"
    # below the chord from CFG@1.5 to CFG@3 but beaten on both axes by CFG@3: worse than CFG, not better
    dominated = _matched(2000, 0.45, 33.0)  # chord: 40 - (0.20 / 0.40) * 10 = 35; CFG@3: 30 at 0.65
    assert dominated["cfg_fid"] == pytest.approx(30.0) and dominated["verdict"] == "refuted"
    # a twin of a CFG point (same accuracy, FID and replicates) is no better than the curve
    twin = _matched(2000, 0.65, 30.0)
    assert twin["difference"] == pytest.approx(0.0) and twin["interval"][0] <= 0 <= twin["interval"][1]
    assert twin["verdict"] == "undecided"


def test_best_scale_is_chosen_on_the_curve_and_compared_at_the_larger_n_both_reached():
    # N = 5,000 only for ATG@2 and CFG@3: too few scales for a curve there, but the pair itself is decided
    rows = [_row("unguided@1", 2000, 0.25, 40.0, 0.37, nfe=20.0), _row("CFG@3", 2000, 0.65, 30.0, 0.38),
            _row("CFG@10", 2000, 0.85, 45.0, 0.40), _row("ATG@2", 2000, 0.30, 31.0, 0.30, nfe=20.0),
            _row("CFG@3", 5000, 0.64, 28.0, 0.38), _row("ATG@2", 5000, 0.30, 27.0, 0.30, nfe=20.0)]
    found = {c["claim"]: c for c in conclusions(Rows(rows))}
    best = found["ATG@2 has lower FID than CFG's lowest-FID scale (CFG@3)"]
    assert best["num_images"] == 5000 and best["difference"] == pytest.approx(-1.0) and best["verdict"] == "confirmed"
    assert found["ATG@2 lies above the CFG curve (accuracy vs FID)"]["num_images"] == 2000


def test_adaptive_rows_are_judged_against_static_truncation_at_their_own_nfe():
    n = 500
    rows = Rows([_row("unguided@1", n, 0.25, 40.0, 0.37, nfe=20.0),
                 _row("Interval 0-0.25@3", n, 0.50, 33.0, 0.38, nfe=25.0),
                 _row("CFG@3", n, 0.65, 30.0, 0.38),
                 _row("AG x0 0.990@3", n, 0.45, 34.0, 0.38, nfe=22.5),  # static at 22.5 NFE: 0.375, FID 36.5
                 _row("LinearAG@3", n, 0.51, 33.5, 0.38, nfe=25.0)])  # exactly the 25-NFE static row
    found = {c["claim"]: c for c in conclusions(rows)}
    ag_accuracy = found["AG x0 0.990@3 (22.5 NFE) has higher class accuracy than static truncation at the same NFE"]
    assert ag_accuracy["difference"] == pytest.approx(0.075) and ag_accuracy["verdict"] == "confirmed"
    assert "between unguided@1 (20 NFE) and Interval 0-0.25@3 (25 NFE)" in ag_accuracy["b"]
    ag_fid = found["AG x0 0.990@3 (22.5 NFE) has lower FID than static truncation at the same NFE"]
    assert ag_fid["difference"] == pytest.approx(-2.5) and ag_fid["verdict"] == "confirmed"
    # an adaptive row that made the static row's very images is reported as such, not as undecided
    twin = {**rows.get("Interval 0-0.25@3", n), "key": "AG eps 0.995@3", "label": "AG eps 0.995"}
    same = {c["claim"]: c for c in conclusions(Rows(list(rows.by.values()) + [twin]))}
    for metric in ("higher class accuracy", "lower FID"):
        claim = same[f"AG eps 0.995@3 (25.0 NFE) has {metric} than static truncation at the same NFE"]
        assert claim["verdict"] == "identical images" and claim["interval"] == [0.0, 0.0]
    shifted = {**twin, "boot": {**twin["boot"], "fid": [f + 1e-9 for f in twin["boot"]["fid"]]}}
    assert {c["claim"]: c for c in conclusions(Rows(list(rows.by.values()) + [shifted]))}[
        "AG eps 0.995@3 (25.0 NFE) has lower FID than static truncation at the same NFE"]["verdict"] == "undecided"
    linear = found["LinearAG@3 (25.0 NFE) has lower FID than static truncation at the same NFE"]
    assert linear["b"].endswith(": Interval 0-0.25@3") and linear["difference"] == pytest.approx(0.5)
    assert linear["verdict"] == "refuted"


def test_dynamic_cfg_against_the_top_of_cfg_accuracy():
    n = 500
    curve = [_row("CFG@3", n, 0.65, 30.0, 0.38), _row("CFG@10", n, 0.85, 45.0, 0.40)]
    dynamic = _row("DynamicCFG default@3", n, 0.80, 35.0, 0.33)
    # CFG@15 ties CFG@10's accuracy (0.86 against 0.85, inside 95%) at a far worse FID: the FID claim is
    # against CFG@10, the best FID at the top accuracy; the accuracy claim against the best scale, CFG@15
    tied = {c["claim"]: c for c in conclusions(Rows(curve + [_row("CFG@15", n, 0.86, 55.0, 0.41), dynamic]))}
    assert tied["DynamicCFG default@3 has higher class accuracy than the best fixed CFG scale (CFG@15)"]["verdict"] \
        == "refuted"
    fid = tied["DynamicCFG default@3 has lower FID than CFG at the top of its accuracy (CFG@10)"]
    assert fid["difference"] == pytest.approx(-10.0) and fid["verdict"] == "confirmed"
    # a best scale clearly above the others is itself the top
    clear = {c["claim"]: c for c in conclusions(Rows(curve + [_row("CFG@15", n, 0.95, 55.0, 0.41), dynamic]))}
    assert "DynamicCFG default@3 has lower FID than CFG at the top of its accuracy (CFG@15)" in clear


def test_conclusions_and_curve_verdicts(tmp_path):
    n = 500
    rows = [_row("CFG@3", n, 0.65, 30.0, 0.38), _row("CFG@10", n, 0.85, 45.0, 0.40),
            _row("CFG@15", n, 0.86, 55.0, 0.41),
            _row("APG@10", n, 0.84, 40.0, 0.35),  # less saturation, lower FID, same accuracy
            _row("EluCD 0.05@3", n, 0.95, 28.0, 0.38),  # dominates CFG@3
            _row("GFCG 4 alone@3", n, 0.55, 40.0, 0.37),  # dominated by CFG@3
            _row("Interval 0-0.25@3", n, 0.50, 33.0, 0.38, nfe=25.0),
            _row("LinearAG@3", n, 0.51, 33.5, 0.38, nfe=25.0),
            _row("APG@15", 50, 0.8, 60.0, 0.30),  # no CFG@15 at N = 50: left out, not guessed
            _row("unguided@1", n, 0.25, 40.0, 0.37, nfe=20.0),  # beaten by CFG@3 on both axes: off the frontier
            _row("ATG@2", n, 0.40, 29.5, 0.30, nfe=20.0)]  # beats only the unguided row: not above the curve
    found = {c["claim"]: c for c in conclusions(Rows(rows))}
    atg = found["ATG@2 lies above the CFG curve (accuracy vs FID)"]
    assert atg["verdict"] == "undecided" and atg["dominates"] == [] and atg["dominated_by"] == []
    assert found["ATG@2 has lower FID than CFG's lowest-FID scale (CFG@3)"]["verdict"] == "confirmed"
    # at its own accuracy (0.40) the straight piece from unguided to CFG@3 reads 36.25, but CFG@3 has more
    # accuracy at FID 30: that is CFG's best at 0.40, and ATG@2 is compared with it
    matched = found["ATG@2 has lower FID than CFG at the same class accuracy"]
    assert matched["cfg_fid"] == pytest.approx(30.0) and matched["difference"] == pytest.approx(-0.5)
    assert matched["verdict"] == "confirmed"
    assert found["GFCG 4 alone@3 has lower FID than CFG at the same class accuracy"]["verdict"] == "refuted"
    # EluCD's accuracy (0.95) is beyond the CFG curve's (0.86 at most): no extrapolated verdict
    assert "EluCD 0.05@3 has lower FID than CFG at the same class accuracy" not in found
    assert found["APG lowers saturation against CFG at w=10"]["verdict"] == "confirmed"
    assert found["APG lowers FID against CFG at w=10"]["verdict"] == "confirmed"
    assert found["APG loses class accuracy against CFG at w=10"]["verdict"] == "undecided"
    assert found["APG raises recall against CFG at w=10"]["verdict"] == "undecided"  # 0.5 each
    assert found["CFG oversaturates: saturation at w=15 above w=3"]["verdict"] == "confirmed"
    assert not any("w=15" in c and "APG" in c for c in found)
    static = [c for c in found.values() if c["a"] == "LinearAG@3" and c["metric"] == "class_accuracy"
              and c["b"] == "static truncation at 25.0 NFE: Interval 0-0.25@3"]
    assert len(static) == 1 and static[0]["verdict"] == "undecided"
    assert found["EluCD 0.05@3 lies above the CFG curve (accuracy vs FID)"]["verdict"] == "confirmed"
    gfcg = curve_verdict(Rows(rows), "GFCG 4 alone@3", "c")
    assert gfcg["verdict"] == "refuted" and gfcg["dominated_by"] == ["CFG@3"]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"meta": {"steps": 20}, "rows": rows}))
    result = report(path, tmp_path, draw=False)
    text = (tmp_path / "results.md").read_text()
    assert "## Rows at N = 500" in text and "## Rows at N = 50\n" in text
    assert len(result["conclusions"]) == len(found)


def test_report_draws_the_three_plots_per_n(tmp_path):
    n = 500
    rows = [_row("unguided@1", n, 0.25, 40.0, 0.37, nfe=20.0), _row("CFG@3", n, 0.65, 30.0, 0.38),
            _row("CFG@10", n, 0.85, 45.0, 0.40), _row("APG@10", n, 0.84, 40.0, 0.35),
            _row("Interval 0-0.25@3", n, 0.50, 33.0, 0.38, nfe=25.0),
            _row("AG x0 0.995@3", n, 0.45, 34.0, 0.38, nfe=24.0),
            _row("EluCD 0.05@3", n, 0.95, 28.0, 0.38), _row("CFG@10", 50, 0.8, 80.0, 0.38)]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"meta": {"steps": 20}, "rows": rows}))
    report(path, tmp_path, draw=True)
    for name in ("accuracy_vs_fid_n500", "saturation_vs_w_n500", "accuracy_vs_nfe_n500", "accuracy_vs_fid_n50"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (tmp_path / "accuracy_vs_nfe_n50.png").exists()  # no static or adaptive row at N = 50


def test_effects_run_continues_a_row_to_the_next_stage_exactly(tmp_path):
    """The measurement command itself, 2 DDIM steps: a row continued from N=10 to N=20 equals a direct
    N=20 row (metrics and paired bootstrap replicates), so the staged plan never changes a number."""
    import effects

    def run(name, stages):
        out = tmp_path / name
        effects.main(["--steps", "2", "--stages", *map(str, stages), "--batch-size", "10", "--only", "CFG@3",
                      "--replicates", "4", "--threads", "1", "--out", str(out), "--state", str(out), "--device",
                      "cpu"])
        return json.loads((out / "rows.json").read_text())["rows"]

    staged, direct = run("staged", [10, 20]), run("direct", [20])
    assert [r["num_images"] for r in staged] == [10, 20] and direct[0]["num_images"] == 20
    for name in ("fid", "class_accuracy", "saturation_mean", "precision", "nfe_per_image"):
        assert staged[1][name] == direct[0][name], name
    assert staged[1]["boot"] == direct[0]["boot"]
    assert staged[0]["fid"] != staged[1]["fid"]  # the second stage really added images


def test_step_rule_decision_pairs_rows_at_matched_accuracy():
    """benchmarks/elucd_step_rule.py: x_t is judged worse only where an x0 row has lower FID at 95% and no
    lower accuracy; a difference inside the intervals leaves it undecided (no worse)."""
    from elucd_step_rule import decide

    rng = np.random.default_rng(0)

    def row(key, group, correct, fid, spread=0.5):
        boot = {"fid": list(fid + spread * rng.standard_normal(200))}
        return {"key": key, "group": group, "num_images": 200, "class_correct": correct,
                "class_accuracy": correct / 200, "fid": fid, "boot": boot}

    x0 = [row("x0 a@3", "x0", 176, 122.0), row("x0 b@3", "x0", 198, 121.0)]
    close = decide(Rows(x0 + [row("xt a@3", "x_t", 178, 122.3)]), 200)
    assert close["verdict"] == "x_t no worse (undecided)" and len(close["pairs"]) == 2
    worse = decide(Rows(x0 + [row("xt a@3", "x_t", 177, 130.0)]), 200)  # same accuracy as "x0 a", FID +8
    # worse than "x0 a" at matched accuracy; dominated by "x0 b" too, which is not counted (another scale)
    assert worse["verdict"] == "x_t worse" and worse["x_t_worse_in"] == [("xt a@3", "x0 a@3")]
    dominated = decide(Rows(x0 + [row("xt e@3", "x_t", 150, 125.0)]), 200)
    assert dominated["verdict"] == "x_t no worse (undecided)"
    assert dominated["interpolated"][0]["extrapolated"] and dominated["interpolated"][0]["fid_diff"] > 0
    # higher accuracy at higher FID is a trade-off, not a loss; dominating a weaker x0 row is not a win
    assert decide(Rows(x0[:1] + [row("xt b@3", "x_t", 199, 124.0)]), 200)["verdict"] == "x_t no worse (undecided)"
    assert decide(Rows(x0[:1] + [row("xt c@3", "x_t", 199, 118.0)]), 200)["verdict"] == "x_t no worse (undecided)"
    better = decide(Rows(x0[:1] + [row("xt d@3", "x_t", 175, 118.0)]), 200)  # matched accuracy, FID -4
    assert better["verdict"] == "x_t better" and better["x_t_better_in"] == [("xt d@3", "x0 a@3")]


def test_readme_tables_are_replaced_between_the_markers_only(tmp_path):
    from effects_report import README_END, README_START, write_readme

    rows = Rows([_row("CFG@3", 500, 0.65, 30.0, 0.38), _row("CFG@10", 500, 0.85, 45.0, 0.40),
                 _row("CFG@3", 2000, 0.66, 20.0, 0.38)])
    found = conclusions(rows)
    readme = tmp_path / "README.md"
    readme.write_text(f"# prose before\n\n{README_START}\nold table\n{README_END}\n\nprose after\n")
    write_readme(readme, rows, found)
    text = readme.read_text()
    assert text.startswith("# prose before\n\n") and text.endswith(f"{README_END}\n\nprose after\n")
    assert "old table" not in text
    assert text.index("Rows at N = 2,000:") < text.index("Rows at N = 500:")  # the largest N first
    assert "CFG oversaturates: saturation at w=10 above w=3 | 500 |" in text
    write_readme(readme, rows, found)
    assert readme.read_text() == text  # idempotent: a second run changes nothing
    for broken in (f"{README_START}\n", f"{README_END}\n{README_START}\n", "no markers\n"):
        readme.write_text(broken)
        with pytest.raises(ValueError, match="--readme .*needs one"):
            write_readme(readme, rows, found)
        assert readme.read_text() == broken  # a refused file is left as it was


def test_readme_tables_match_the_committed_rows():
    """The effects page's tables are the report of benchmarks/results/effects/rows.json, not hand-edited numbers."""
    from effects_report import README_END, README_START, readme_block

    root = Path(__file__).resolve().parents[1]
    rows = Rows(json.loads((root / "benchmarks/results/effects/rows.json").read_text())["rows"])
    text = (root / "docs" / "effects.md").read_text()
    shown = README_START + text.split(README_START)[1].split(README_END)[0] + README_END
    assert shown == readme_block(rows, conclusions(rows)), \
        "docs/effects.md tables are stale: run python benchmarks/effects_report.py --readme docs/effects.md"


def test_holm_keeps_only_the_claims_that_survive_the_family_of_the_table():
    from effects_report import holm, interval_p_value

    # the implied p-value is below 0.05 exactly when the 95% interval excludes 0
    assert interval_p_value(1.0, (0.02, 1.98)) < 0.05 < interval_p_value(1.0, (-0.02, 2.02))
    assert interval_p_value(-2.0, (-3.0, -1.0)) == pytest.approx(math.erfc(3.92 / math.sqrt(2)))
    claims = [{"difference": d, "interval": [d - w, d + w], "verdict": v} for d, w, v in [
        (1.0, 0.2, "confirmed"),    # z = 9.8: survives any family
        (-1.0, 0.9, "refuted"),     # z = 2.18, p = 0.029: raw verdict, not after Holm over 3
        (0.1, 0.5, "undecided"),
    ]] + [{"dominates": [], "dominated_by": [], "verdict": "undecided"}]
    holm(claims)
    assert [c["holm"] for c in claims] == ["confirmed", "undecided", "undecided", "-"]
    alone = [dict(claims[1])]
    holm(alone)
    assert alone[0]["holm"] == "refuted"  # a family of one: Holm is the raw test
