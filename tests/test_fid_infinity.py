"""FID extrapolated to infinitely many images (benchmarks/fid_infinity.py) and the checkpoint reader it shares
with the effects measurement."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from effects_stats import weighted_fid  # noqa: E402
from fid_infinity import extrapolate, fid_infinity, fit_sizes, markdown, subset_counts  # noqa: E402

D, N, SIZES = 64, 2000, (400, 500, 667, 1000, 2000)


def _gaussian(shift: float, seed: int) -> torch.Tensor:
    """N(shift e_1, I) in D dimensions: its FID against N(0, I) is shift ** 2 exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    x[:, 0] += shift
    return x


def test_subsets_have_their_size_and_come_from_their_resample():
    counts = subset_counts(10, [4, 10], replicates=3)
    assert all(c.shape == (4, 10) for c in counts.values())
    assert counts[4].sum(1).tolist() == [4.0] * 4 and counts[10].sum(1).tolist() == [10.0] * 4
    assert counts[4][0].max() == 1 and counts[10][0].tolist() == [1.0] * 10  # the estimate: distinct images, all at n
    assert any(c.max() > 1 for c in counts[10][1:])  # replicates resample with replacement
    assert all(torch.equal(a, b) for a, b in zip(counts.values(), subset_counts(10, [4, 10], 3).values()))
    assert not torch.equal(counts[4], subset_counts(10, [4, 10], 3, seed=1)[4])
    with pytest.raises(ValueError, match="size=11; allowed: 1 <= size <= 10"):
        subset_counts(10, [11], 1)


def test_fit_sizes_start_at_the_feature_dimension_and_are_even_in_one_over_n():
    sizes = fit_sizes(2048, 5000)
    assert sizes[0] == 2048 and sizes[-1] == 5000 and len(sizes) == 6
    steps = np.diff(1.0 / np.array(sizes))
    assert np.allclose(steps, steps[0], rtol=0.01)  # up to rounding N to whole images
    with pytest.raises(ValueError, match="allowed: 0 < low < high"):
        fit_sizes(5000, 2048)


def test_extrapolation_reads_the_line_at_zero():
    sizes = np.array([100, 200, 400])
    fids = np.stack([5.0 + 300.0 / sizes, 2.0 + 100.0 / sizes])  # two exact lines in 1/N
    assert extrapolate(sizes, fids) == pytest.approx([5.0, 2.0])


def test_fid_inf_removes_the_small_sample_bias_of_a_known_gaussian():
    zero, eye = torch.zeros(D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)
    x = _gaussian(1.0, seed=0)
    result = fid_infinity({"a": x}, zero, eye, sizes=SIZES, replicates=10, progress=False)
    row = result["rows"]["a"]
    # FID of 2,000 samples is biased upwards by about 0.6 here; the extrapolation lands within 0.1 of 1
    assert row["fid_by_size"][-1] > 1.5 and row["fid_inf"] == pytest.approx(1.0, abs=0.1)
    assert row["interval"][0] < 1.0 < row["interval"][1]
    # FID_N is the mean over the blocks: at the largest size it is the FID of all the images
    assert row["fid_by_size"][-1] == pytest.approx(weighted_fid(x, zero, eye, torch.ones(1, N)).item())
    assert list(result["sizes"]) == list(SIZES) and "FID_inf" in markdown(result)


def test_pairs_share_their_resamples():
    zero, eye = torch.zeros(D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)
    x, far = _gaussian(1.0, seed=0), _gaussian(2.0, seed=1)
    result = fid_infinity({"same": x, "copy": x.clone(), "far": far}, zero, eye, sizes=SIZES, replicates=10,
                          progress=False)
    by = {(d["a"], d["b"]): d for d in result["differences"]}
    twin = by[("same", "copy")]
    assert twin["fid_inf"] == 0.0 and twin["interval"] == [0.0, 0.0] and twin["verdict"] == "undecided"
    apart = by[("same", "far")]  # truth: 1 - 4 = -3
    # one random subset per size: a noisier estimate than the mean of blocks, still near the truth
    assert apart["fid_inf"] == pytest.approx(-3.0, abs=0.4) and apart["verdict"] == "confirmed"
    assert set(apart["by_range"]) == {"all sizes", "smaller sizes", "larger sizes"}
    assert all(r["verdict"] == "confirmed" for r in apart["by_range"].values())


def test_too_few_images_for_four_sizes_is_refused():
    zero, eye = torch.zeros(D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)
    with pytest.raises(ValueError, match="allowed: at least 4"):
        fid_infinity({"a": _gaussian(1.0, 0)[:600]}, zero, eye, sizes=SIZES, replicates=2, progress=False)


def test_checkpoint_features_are_in_image_order_and_refuse_more_than_they_hold(tmp_path):
    import effects

    features = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    indices = torch.tensor([3, 4, 5, 0, 1, 2])  # batches finished out of order
    state = {"metrics": {"inception": {"features": [features[:3], features[3:]], "indices": [indices[:3], indices[3:]]},
                         "saturation": {"saturation": [indices[:3].double(), indices[3:].double()]}}}
    torch.save(state, tmp_path / "row.pt")
    got, saturation = effects.checkpoint_features(tmp_path / "row.pt", 4)
    assert saturation.tolist() == [0.0, 1.0, 2.0, 3.0] and got.tolist() == features[[3, 4, 5, 0]].tolist()
    with pytest.raises(ValueError, match="holds 6 images; n=7 asked"):
        effects.checkpoint_features(tmp_path / "row.pt", 7)


def test_cached_rows_are_not_recomputed(tmp_path):
    zero, eye = torch.zeros(D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)
    first = fid_infinity({"CFG@3": _gaussian(1.0, 0)}, zero, eye, sizes=SIZES, replicates=3, progress=False,
                         cache=tmp_path)
    # the same key with other features reads the cache: what the first call computed comes back
    again = fid_infinity({"CFG@3": _gaussian(2.0, 1)}, zero, eye, sizes=SIZES, replicates=3, progress=False,
                         cache=tmp_path)
    assert again["rows"] == first["rows"] and len(list(tmp_path.glob("CFG@3-n2000-r3-*.npy"))) == 1
    fresh = fid_infinity({"CFG@3": _gaussian(2.0, 1)}, zero, eye, sizes=SIZES, replicates=4, progress=False,
                         cache=tmp_path)  # other replicates: another file
    assert fresh["rows"]["CFG@3"]["fid_inf"] == pytest.approx(4.0, abs=0.3)
