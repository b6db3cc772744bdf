"""Index recipes and the builder: every recipe against exact search, safety, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from helpers import (
    assert_clean_error,
    clustered_digits,
    exact_knn,
    make_collection,
    pair_distances,
    run_cli,
    tree,
)

from mnist_ann.api import Collection
from mnist_ann.errors import InvalidArgument
from mnist_ann.index.build import build_indexes, make_index, train_and_add
from mnist_ann.index.params import make_search_parameters
from mnist_ann.index.recipes import fitted_nlist, nprobe_grid, resolve_recipe

SYNTHETIC_SPLIT = ["--split", "seed", "--test-size", "0.1", "--random-state", "0"]
RECIPES = ["flat", "ivf", "hnsw", "pcahnsw=PCA48,HNSW16,RFlat", "sq=IVF32,SQ8"]


@pytest.fixture
def synthetic(isolated: Path) -> Collection:
    images, labels = clustered_digits(6000, seed=1)
    return make_collection(isolated / "store", "syn", images, labels)


@pytest.fixture(scope="module")
def every_recipe(tmp_path_factory: pytest.TempPathFactory) -> Collection:
    """The 6,000 synthetic digits with every recipe of RECIPES built (read-only)."""
    images, labels = clustered_digits(6000, seed=1)
    collection = make_collection(tmp_path_factory.mktemp("recipes"), "syn", images, labels)
    build_indexes(collection, [resolve_recipe(spec, len(collection.train()))
                               for spec in RECIPES], threads=2)
    return Collection.open(collection.root.parent, "syn")


@pytest.fixture(scope="module")
def every_recipe_truth(every_recipe: Collection) -> np.ndarray:
    """Exact squared distances of the 10 nearest training rows of each test row."""
    return exact_knn(every_recipe.train().pixels, every_recipe.test().pixels, 10)[0]


def recall_at(found: np.ndarray, true_distances: np.ndarray, found_distances: np.ndarray,
              k: int) -> float:
    """ann-benchmarks recall: a result counts when its distance is within the true k-th."""
    threshold = true_distances[:, k - 1:k] * (1 + 1e-6) + 1e-3
    return float(((found_distances <= threshold) & (found >= 0)).sum() / found.size)


@pytest.mark.parametrize("spec", RECIPES)
def test_every_recipe_finds_the_true_neighbours(every_recipe: Collection, every_recipe_truth,
                                                spec: str) -> None:
    train, test = every_recipe.train(), every_recipe.test()
    recipe = resolve_recipe(spec, len(train))
    entry = every_recipe.indexes[recipe.name]
    index = faiss.read_index(str(every_recipe.root / entry["file"]))
    assert index.ntotal == len(train)
    queries = test.pixels.astype(np.float32)
    params = make_search_parameters(index, recipe.search_defaults)
    distances, found = index.search(queries, 10, params=params)
    true_distances = every_recipe_truth
    recall = recall_at(found, true_distances, pair_distances(train.pixels, test.pixels, found),
                       10)
    if recipe.name == "flat":
        assert recall == 1.0
        # float32 distances of ~1e5 are off by a unit or so; the query layer re-ranks exactly
        np.testing.assert_allclose(distances, true_distances, rtol=1e-4)
    else:
        assert recall >= 0.95, recall


@pytest.mark.parametrize("spec", RECIPES)
def test_saved_index_searches_like_the_one_in_memory(every_recipe: Collection,
                                                     spec: str) -> None:
    recipe = resolve_recipe(spec, len(every_recipe.train()))
    reloaded = every_recipe.load_index(recipe.name).index
    rebuilt = faiss.deserialize_index(faiss.serialize_index(reloaded))
    queries = every_recipe.test().pixels.astype(np.float32)
    params = make_search_parameters(reloaded, recipe.search_defaults)
    first = reloaded.search(queries, 7, params=params)
    second = rebuilt.search(queries, 7, params=params)
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[0], second[0])


def test_in_memory_index_equals_its_file(synthetic: Collection) -> None:
    recipe = resolve_recipe("ivf", len(synthetic.train()))
    vectors = synthetic.train().pixels.astype(np.float32)
    faiss.omp_set_num_threads(1)
    in_memory = make_index(recipe, 784)
    train_and_add(in_memory, vectors, "ivf")
    path = synthetic.root / "copy.faiss"
    faiss.write_index(in_memory, str(path))
    loaded = faiss.read_index(str(path))
    queries = synthetic.test().pixels.astype(np.float32)
    params = make_search_parameters(in_memory, recipe.search_defaults)
    np.testing.assert_array_equal(in_memory.search(queries, 7, params=params)[1],
                                  loaded.search(queries, 7, params=params)[1])


def test_a_large_training_set_trains_on_a_seeded_sample(synthetic: Collection,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from mnist_ann.index import build

    monkeypatch.setattr(build, "TRAIN_SAMPLE", 1000)
    pixels = synthetic.train().pixels
    sample = build.training_sample(pixels)
    assert sample.dtype == np.float32 and len(sample) == 1000
    rows = [np.flatnonzero((pixels == row).all(axis=1))[0] for row in sample[:50]]
    assert rows == sorted(rows) and len(set(rows)) == 50  # rows of the set, in row order
    np.testing.assert_array_equal(sample, build.training_sample(pixels))  # seeded
    logged = []
    recipe = resolve_recipe("pca=PCA16,Flat", len(pixels))
    build_indexes(synthetic, [recipe], threads=1, log=logged.append)
    assert any("a seeded sample of 5,400" in line for line in logged), logged
    # the PCA was fitted on the sample alone: the same as one trained on it here
    stored = faiss.downcast_index(synthetic.load_index("pca").index)
    reference = make_index(recipe, 784)
    reference.train(sample)
    pca, expected = (faiss.downcast_VectorTransform(index.chain.at(0))
                     for index in (stored, reference))
    np.testing.assert_array_equal(faiss.vector_to_array(pca.A), faiss.vector_to_array(expected.A))


def test_manifest_entry_records_the_build(synthetic: Collection) -> None:
    (result,) = build_indexes(synthetic, [resolve_recipe("hnsw", 5400)], threads=2)
    manifest = json.loads((synthetic.root / "manifest.json").read_text())
    entry = manifest["indexes"]["hnsw"]
    assert entry == result.entry
    assert entry["factory"] == "HNSW32" and entry["build_args"]["efConstruction"] == 40
    assert entry["search_defaults"] == {"efSearch": 64}
    assert entry["train_sha256"] == manifest["files"]["train.parquet"]["sha256"]
    assert entry["ntotal"] == 5400 and entry["threads"] == 2
    assert entry["faiss_version"] == faiss.__version__ and entry["simd"]
    assert manifest["files"][entry["file"]]["sha256"] == entry["sha256"]
    assert (synthetic.root / entry["file"]).stat().st_size == entry["bytes"]


def test_nlist_is_fitted_to_the_training_size() -> None:
    assert fitted_nlist(56_000) == 1024
    assert fitted_nlist(5_400) == 5_400 // 39
    assert fitted_nlist(39) == 1
    with pytest.raises(InvalidArgument, match="too small a training set"):
        fitted_nlist(38)
    assert nprobe_grid(1024)[-1] == 1024 and nprobe_grid(138)[-2:] == [128, 138]


def test_build_command_builds_keeps_and_forces(synthetic: Collection) -> None:
    first = run_cli("build", *SYNTHETIC_SPLIT, "--collection", "syn", "--json", "--threads", "2")
    assert first.exit_code == 0, first.stderr
    rows = json.loads(first.stdout)["indexes"]
    assert [(r["index"], r["status"], r["ntotal"]) for r in rows] == [
        ("flat", "built", 5400), ("ivf", "built", 5400), ("hnsw", "built", 5400)]
    assert "ivf: training on 5,400 vectors" in first.stderr
    files = sorted(p.name for p in synthetic.root.glob("*.faiss"))
    second = run_cli("build", *SYNTHETIC_SPLIT, "--collection", "syn", "--index", "hnsw")
    assert second.exit_code == 0
    assert "hnsw: already built from this recipe and training table; kept" in second.stderr
    assert "kept" in second.stdout
    forced = run_cli("build", *SYNTHETIC_SPLIT, "--collection", "syn", "--index", "flat",
                     "--force", "--quiet")
    assert forced.exit_code == 0 and forced.stderr == ""
    assert sorted(p.name for p in synthetic.root.glob("*.faiss")) == files  # same content
    info = run_cli("info", "syn").stdout
    assert "index hnsw: HNSW32 (hnsw), 5,400 vectors" in info


def test_an_existing_collection_needs_no_split_options(synthetic: Collection) -> None:
    result = run_cli("build", "--collection", "syn", "--index", "flat", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["collection"]["split"] == {
        "kind": "seed", "test_size": 0.1, "random_state": 0}
    assert "exists with split" in result.stderr
    assert_clean_error(run_cli("build", "--collection", "syn", "--split", "standard"), 1,
                       "holds split")


def test_custom_factory_through_the_cli(synthetic: Collection) -> None:
    result = run_cli("build", *SYNTHETIC_SPLIT, "--collection", "syn", "--index",
                     "fast=PCA64,HNSW32,RFlat", "--json")
    assert result.exit_code == 0, result.stderr
    entry = Collection.open(synthetic.root.parent, "syn").indexes["fast"]
    assert entry["factory"] == "PCA64,HNSW32,RFlat"
    assert entry["search_defaults"] == {"efSearch": 64}


def test_unknown_recipe_lists_the_known_ones(synthetic: Collection) -> None:
    before = tree(synthetic.root)
    error = assert_clean_error(run_cli("build", *SYNTHETIC_SPLIT, "--collection", "syn",
                                       "--index", "annoy"), 2, "unknown recipe 'annoy'")
    assert "flat, ivf, hnsw" in error
    assert tree(synthetic.root) == before


def test_invalid_factory_string(synthetic: Collection) -> None:
    before = tree(synthetic.root)
    assert_clean_error(run_cli("build", *SYNTHETIC_SPLIT, "--collection", "syn", "--index",
                               "bad=HNSW32,Nonsense"), 2, "invalid FAISS factory string")
    assert tree(synthetic.root) == before


def test_nlist_larger_than_the_training_set(synthetic: Collection) -> None:
    before = tree(synthetic.root)
    assert_clean_error(run_cli("build", *SYNTHETIC_SPLIT, "--collection", "syn", "--index",
                               "big=IVF8192,Flat"), 2, "nlist 8192 is larger than the training")
    assert tree(synthetic.root) == before


def test_too_small_a_training_set_for_ivf(isolated: Path) -> None:
    images, labels = clustered_digits(40, seed=2)
    tiny = make_collection(isolated / "store", "tiny", images, labels)
    before = tree(tiny.root)
    assert_clean_error(run_cli("build", *SYNTHETIC_SPLIT, "--collection", "tiny", "--index",
                               "ivf"), 2, "too small a training set for IVF")
    assert tree(tiny.root) == before


def test_parquet_failing_its_checksum(synthetic: Collection) -> None:
    path = synthetic.root / "test.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    before = tree(synthetic.root)
    assert_clean_error(run_cli("build", *SYNTHETIC_SPLIT, "--collection", "syn"), 1,
                       "fails its checksum")
    assert tree(synthetic.root) == before


def test_read_only_collection(synthetic: Collection) -> None:
    from test_cli_foundation import read_only

    before = tree(synthetic.root)
    with read_only(synthetic.root):
        assert_clean_error(run_cli("build", *SYNTHETIC_SPLIT, "--collection", "syn"), 1,
                           "not writable")
    assert tree(synthetic.root) == before


def test_name_clash_with_another_recipe(synthetic: Collection) -> None:
    assert run_cli("build", *SYNTHETIC_SPLIT, "--collection", "syn", "--index",
                   "mine=HNSW16").exit_code == 0
    before = tree(synthetic.root)
    assert_clean_error(run_cli("build", *SYNTHETIC_SPLIT, "--collection", "syn", "--index",
                               "mine=HNSW8"), 1, "use --force")
    assert tree(synthetic.root) == before
    forced = run_cli("build", *SYNTHETIC_SPLIT, "--collection", "syn", "--index",
                     "mine=HNSW8", "--force")
    assert forced.exit_code == 0
    entry = Collection.open(synthetic.root.parent, "syn").indexes["mine"]
    assert entry["factory"] == "HNSW8"
    assert len(list(synthetic.root.glob("mine-*.faiss"))) == 1  # the old file is gone


def test_interrupted_build_leaves_the_previous_state(synthetic: Collection) -> None:
    args = [*SYNTHETIC_SPLIT, "--collection", "syn", "--index", "hnsw", "--threads", "2"]
    assert run_cli("build", *args).exit_code == 0
    before = tree(synthetic.root)
    # killed by the build itself while it adds vectors: a deterministic point, no sleep
    process = subprocess.run([sys.executable, "-m", "mnist_ann", "build", *args, "--force"],
                             capture_output=True, text=True, check=False,
                             env={**os.environ, "MNIST_ANN_KILL_AT": "added:hnsw"})
    assert process.returncode == -signal.SIGKILL, process.stderr
    after = {name: data for name, data in tree(synthetic.root).items()
             if ".tmp-" not in name}
    assert after == before
    orphan = synthetic.root / "hnsw-000000000000.faiss"  # as if killed after the rename
    orphan.write_bytes(b"never recorded")
    rebuilt = run_cli("build", *args, "--force")
    assert rebuilt.exit_code == 0
    assert not [p for p in synthetic.root.iterdir() if ".tmp-" in p.name]
    assert not orphan.exists()
    manifest = json.loads((synthetic.root / "manifest.json").read_text())
    assert sorted(p.name for p in synthetic.root.glob("*.faiss")) == [
        manifest["indexes"]["hnsw"]["file"]]
