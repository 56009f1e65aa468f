"""Shared fixtures: the data setting (GUIDANCE_KIT_DATA) and a small real reference.

Data-dependent tests find CIFAR-10 through one setting, the environment variable GUIDANCE_KIT_DATA:
a folder holding `cifar10/test.npz` (the layout of ../shared/data; `.ci/run` sets it from there).
Unset, those tests are skipped with that reason; set but wrong, they fail (CI must not pass without data).
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

DATA_ENV = "GUIDANCE_KIT_DATA"


def cifar10_folder() -> Path:
    """The folder holding CIFAR-10's train.npz / test.npz: skip when the data setting is absent, fail when
    it is given but points nowhere useful."""
    value = os.environ.get(DATA_ENV)
    if not value:
        pytest.skip(f"needs CIFAR-10: set {DATA_ENV} to a folder holding cifar10/test.npz "
                    "(CI sets it to ../shared/data)")
    folder = Path(value) / "cifar10"
    if not (folder / "test.npz").is_file():
        pytest.fail(f"{DATA_ENV}={value!r}: {folder / 'test.npz'} does not exist")
    return folder


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    return cifar10_folder()


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: the CPU is shared (CI, training jobs) and oversubscribed OpenMP
    threads spin, which makes tests many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread_per_module():
    """One torch thread for a whole module, its module-scoped fixtures included (`one_thread` above starts
    too late for those). Tiny models run fastest single-threaded; more threads only oversubscribe a busy
    CPU. Use with `pytestmark = pytest.mark.usefixtures("one_thread_per_module")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> str:
    """Statistics of 24 images through our Inception: CIFAR-10 test images when the data setting is given,
    else random images (the tests that use it compare runs with each other, not with a known FID)."""
    from evaluation import InceptionFeatures, compute_reference_stats

    torch.set_num_threads(1)
    if os.environ.get(DATA_ENV):
        source = cifar10_folder() / "test.npz"
    else:
        source = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    stats = compute_reference_stats(source, InceptionFeatures(device="cpu"), batch_size=24, limit=24,
                                    keep_features=True, progress=False, shuffle_seed=0)
    path = tmp_path_factory.mktemp("ref") / "ref.npz"
    stats.save(path)
    return str(path)
