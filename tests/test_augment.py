"""Deformed copies of the training digits: seeded, smooth, never the test set, and tuned
leave-one-out without a digit's own copies."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_clean_error, clustered_digits, run_cli

from mnist_ann.data.augment import MNIST_ROWS, augmented_copies, deform, source_ids
from mnist_ann.data.mnist import Dataset, Split
from mnist_ann.evaluation.tune import HeldOut, drop_self
from mnist_ann.index.neighbours import Neighbours
from mnist_ann.store.manage import create_collection


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return clustered_digits(600, seed=21)


def test_a_deformation_is_seeded_small_and_smooth(mnist) -> None:
    images = mnist.images[:300]
    first = deform(images, np.random.default_rng(1))
    np.testing.assert_array_equal(first, deform(images, np.random.default_rng(1)))
    other = deform(images, np.random.default_rng(2))
    assert (first != other).any(axis=1).mean() > 0.9
    changed = np.abs(first.astype(int) - images.astype(int))
    assert (changed.sum(axis=1) > 0).all()  # every copy differs from its digit
    ink_before, ink_after = images.sum(axis=1, dtype=float), first.sum(axis=1, dtype=float)
    assert np.all(np.abs(ink_after / ink_before - 1) < 0.25)  # moved, not erased or smeared
    # a copy stays nearer its own digit than to a typical other digit
    own = ((first.astype(float) - images) ** 2).sum(axis=1)
    between = ((images[:, None].astype(float) - images[None]) ** 2).sum(-1)
    assert np.mean(own < np.median(between, axis=1)) > 0.9


def test_copies_carry_ids_that_lead_back_to_their_digit(digits) -> None:
    images, labels = digits
    ids = np.arange(len(labels)) * 3
    copies = list(augmented_copies(ids, labels, images, 2, seed=4))
    assert [part[0][0] for part in copies] == [MNIST_ROWS, 2 * MNIST_ROWS]
    for copy_ids, copy_labels, _ in copies:
        np.testing.assert_array_equal(source_ids(copy_ids), ids)
        np.testing.assert_array_equal(copy_labels, labels)
    again = list(augmented_copies(ids, labels, images, 2, seed=4))
    np.testing.assert_array_equal(copies[1][2], again[1][2])
    assert (copies[0][2] != copies[1][2]).any()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_augmented_collection_is_deterministic_and_keeps_the_test_set(digits,
                                                                         tmp_path: Path):
    images, labels = digits
    dataset = Dataset(images, labels, "synthetic")

    def made(store: str, **augment) -> Path:
        split = Split.make("seed", 0.1, 0, **augment)
        return create_collection(tmp_path / store, split.default_name, dataset, split).root

    plain = made("a")
    twice = [made(store, augment=2, augment_seed=5) for store in ("b", "c")]
    other_seed = made("d", augment=2, augment_seed=6)
    assert twice[0].name == "seed-t0.1-r0-aug2-s5"
    assert sha(twice[0] / "train.parquet") == sha(twice[1] / "train.parquet")
    assert sha(other_seed / "train.parquet") != sha(twice[0] / "train.parquet")
    for root in (*twice, other_seed):
        assert sha(root / "test.parquet") == sha(plain / "test.parquet")
    from mnist_ann.api import Collection

    base, augmented = Collection.open(plain.parent, plain.name).train(), Collection.open(
        twice[0].parent, twice[0].name).train()
    n = len(base)
    assert len(augmented) == 3 * n
    np.testing.assert_array_equal(augmented.ids[:n], base.ids)
    np.testing.assert_array_equal(augmented.pixels[:n], base.pixels)
    np.testing.assert_array_equal(augmented.ids[n:], np.concatenate(
        [base.ids + MNIST_ROWS, base.ids + 2 * MNIST_ROWS]))
    np.testing.assert_array_equal(augmented.labels, np.tile(base.labels, 3))
    collection = Collection.open(twice[0].parent, twice[0].name)
    assert collection.split == Split.make("seed", 0.1, 0, augment=2, augment_seed=5)
    assert collection.manifest["rows"]["train"] == 3 * n


def test_leave_one_out_drops_every_copy_of_the_held_out_digit() -> None:
    sources = np.array([0, 1, 2, 0, 1, 2])  # rows 3-5 are copies of rows 0-2
    found = Neighbours(np.array([[3, 0, 1, 4], [1, 2, 4, 5]]),
                       np.array([[0., 0, 5, 6], [0., 3, 4, 7]]))
    kept = drop_self(found, np.array([0, 1]), 2, sources)
    np.testing.assert_array_equal(kept.rows, [[1, 4], [2, 5]])
    np.testing.assert_array_equal(kept.distances, [[5, 6], [3, 7]])

    class Train:
        ids = np.concatenate([np.arange(10), np.arange(10) + MNIST_ROWS])

        def __len__(self) -> int:
            return 20

    held = HeldOut.draw(Train(), 5, seed=0)
    assert held.copies == 2 and (held.rows < 10).all()


def test_augment_options_are_checked() -> None:
    assert_clean_error(run_cli("build", "--augment-seed", "3", "--index", "flat"), 2,
                       "--augment-seed goes with --augment")
    assert run_cli("build", "--augment", "101").exit_code == 2
    assert Split.from_dict(Split.make("standard", augment=3, augment_seed=1).to_dict()) == \
        Split.make("standard", augment=3, augment_seed=1)
    assert Split.make("standard").to_dict() == {"kind": "standard"}  # older manifests match
