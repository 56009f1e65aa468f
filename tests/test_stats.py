"""Reference statistics: resumable computation and the stats command."""

import numpy as np
import pytest
import torch

from evaluation import ReferenceStats, compute_reference_stats
from evaluation.cli import main as cli_main


class PixelMoments(torch.nn.Module):
    """A cheap stand-in extractor: per-channel means and stds as 6-d features."""

    preset, extractor_id, feature_dim = "none", "pixel-moments", 6

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.unit = torch.nn.Parameter(torch.ones(()))
        self.calls, self.fail_at = 0, fail_at

    def forward(self, images):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        x = images.double() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1) * self.unit


def test_interrupted_reference_stats_resume_to_identical_moments(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    full = compute_reference_stats(images, PixelMoments(), batch_size=4, keep_features=True, progress=False)
    ckpt = tmp_path / "ref.partial"
    with pytest.raises(KeyboardInterrupt):
        compute_reference_stats(images, PixelMoments(fail_at=7), batch_size=4, keep_features=True, progress=False,
                                checkpoint=ckpt, checkpoint_every=2)
    resumed_extractor = PixelMoments()
    resumed = compute_reference_stats(images, resumed_extractor, batch_size=4, keep_features=True, progress=False,
                                      checkpoint=ckpt, checkpoint_every=2)
    assert resumed_extractor.calls == 10 - 6  # batches 7..10 only
    assert resumed.n == full.n == 40
    assert torch.equal(resumed.mu, full.mu) and torch.equal(resumed.sigma, full.sigma)
    assert torch.equal(resumed.features, full.features)
    with pytest.raises(ValueError, match="belongs to another computation"):
        compute_reference_stats(images, PixelMoments(), batch_size=8, checkpoint=ckpt, progress=False)


def test_stats_command_writes_float64_stats_with_a_random_feature_subset(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(6)
    np.savez(tmp_path / "imgs.npz", images=images, labels=labels)
    out = tmp_path / "stats" / "ref.npz"
    cli_main(["stats", "--source", str(tmp_path / "imgs.npz"), "--out", str(out), "--keep-features", "4",
              "--batch-size", "3", "--device", "cpu"])
    stats = ReferenceStats.load(out, feature_dim=2048)
    assert stats.n == 6 and stats.mu.dtype == torch.float64 and stats.features.shape == (4, 2048)
    assert not (tmp_path / "stats" / "ref.npz.partial").exists()


def test_shipped_cifar10_statistics_are_consistent():
    """Both shipped CIFAR-10 references: their metadata, and real train vs real test giving a small FID
    (3.1 in the literature with the original images; ours are JPEG re-encodes of both splits: 3.12)."""
    from evaluation.fid import frechet_distance
    from evaluation.runner import SHIPPED_REFERENCES

    test = ReferenceStats.load(SHIPPED_REFERENCES["cifar10-test"], feature_dim=2048)
    train = ReferenceStats.load(SHIPPED_REFERENCES["cifar10-train"], feature_dim=2048)
    for stats, n in ((test, 10_000), (train, 50_000)):
        assert stats.n == n and stats.preset == "legacy_tf" and stats.extractor_id == "inception-2015-12-05-pool3"
        assert stats.mu.dtype == stats.sigma.dtype == torch.float64 and stats.features.shape == (1000, 2048)
        assert torch.equal(stats.sigma, stats.sigma.T) and float(torch.linalg.eigvalsh(stats.sigma).min()) > -1e-8
    fid = float(frechet_distance(train.mu, train.sigma, test.mu, test.sigma))
    assert 2.5 < fid < 4.0, fid


@pytest.mark.parametrize("change", ["source", "preset"])
def test_a_partial_computation_resumed_with_another_source_or_preset_is_refused(tmp_path, change):
    """Before: `stats` interrupted and rerun with another --source or --preset exited 0 with both mixed in."""
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    ckpt = tmp_path / "ref.partial"
    with pytest.raises(KeyboardInterrupt):
        compute_reference_stats(images, PixelMoments(fail_at=7), batch_size=4, progress=False, checkpoint=ckpt,
                                checkpoint_every=2)
    other_images = images[::-1].copy() if change == "source" else images
    extractor = PixelMoments()
    if change == "preset":
        extractor.preset = "clean"
    with pytest.raises(ValueError, match=rf"belongs to another computation \(differing: {change}"):
        compute_reference_stats(other_images, extractor, batch_size=4, progress=False, checkpoint=ckpt,
                                checkpoint_every=2)
