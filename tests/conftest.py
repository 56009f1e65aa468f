"""Shared fixtures: a small real reference (24 CIFAR-10 test images through our Inception)."""

from pathlib import Path

import numpy as np
import pytest
import torch

CIFAR_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "test.npz"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: the CPU is shared (CI, training jobs) and oversubscribed OpenMP
    threads spin, which makes tests many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> str:
    from evaluation import InceptionFeatures, compute_reference_stats

    torch.set_num_threads(1)
    if CIFAR_TEST.is_file():
        source = CIFAR_TEST
    else:  # outside the project's CI layout: any real-looking images do
        source = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    stats = compute_reference_stats(source, InceptionFeatures(device="cpu"), batch_size=24, limit=24,
                                    keep_features=True, progress=False, shuffle_seed=0)
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    stats.save(path)
    return str(path)
