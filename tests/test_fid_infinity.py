"""FID extrapolated to infinitely many images (benchmarks/fid_infinity.py) and the checkpoint reader it shares
with the effects measurement."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from effects_stats import weighted_fid  # noqa: E402
from fid_infinity import block_counts, bootstrap_orders, extrapolate, fid_infinity, markdown  # noqa: E402

D, N, SIZES = 64, 2000, (400, 500, 667, 1000, 2000)


def _gaussian(shift: float, seed: int) -> torch.Tensor:
    """N(shift e_1, I) in D dimensions: its FID against N(0, I) is shift ** 2 exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    x[:, 0] += shift
    return x


def test_blocks_are_disjoint_and_consecutive():
    order = np.array([4, 2, 0, 1, 3, 2])
    counts = block_counts(order, 2)
    assert counts.tolist() == [[0, 0, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]]
    assert block_counts(order, 4).sum().item() == 4  # the last, partial block is left out
    with pytest.raises(ValueError, match="size=7; allowed: 1 <= size <= 6"):
        block_counts(order, 7)


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
    assert apart["fid_inf"] == pytest.approx(-3.0, abs=0.25) and apart["verdict"] == "confirmed"
    orders = bootstrap_orders(10, 3)
    assert orders[0].tolist() == list(range(10)) and len(orders) == 4
    assert all(a.tolist() == b.tolist() for a, b in zip(orders, bootstrap_orders(10, 3)))  # reproducible


def test_too_few_images_for_three_sizes_is_refused():
    zero, eye = torch.zeros(D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)
    with pytest.raises(ValueError, match="allowed: at least 3"):
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
