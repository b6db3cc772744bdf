"""The store's promises: concurrent writers lose nothing, writes are durable and atomic, a
build killed at any point leaves a collection that verifies, and every error is one line."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    assert_clean_error,
    cli,
    clustered_digits,
    finish,
    make_collection,
    one_error_line,
    run_cli,
    tree,
    wait_for_line,
)

from mnist_ann.api import Collection
from mnist_ann.index.build import build_indexes
from mnist_ann.index.recipes import resolve_recipe
from mnist_ann.store.lock import locked

SPLIT = ["--split", "seed", "--test-size", "0.1", "--random-state", "0"]


def store_state(collection: Collection) -> dict:
    """Every file of the collection that is not a lock, with its bytes."""
    return {name: data for name, data in tree(collection.root).items() if name != ".lock"}


def assert_consistent(collection: Collection, leftovers: bool = False) -> dict:
    """The collection verifies, and no index file or temporary lies unrecorded (with
    `leftovers`, a writer just killed may have left some: the next build sweeps them)."""
    code, out, err = finish(cli(collection.root.parent, "verify", collection.name, "--json"))
    assert code == 0, (out, err)
    manifest = json.loads((collection.root / "manifest.json").read_text())
    on_disk = {p.name for p in collection.root.iterdir()
               if p.suffix == ".faiss" or p.name.endswith(".build.json")}
    recorded = {entry[key] for entry in manifest["indexes"].values()
                for key in ("file", "record")}
    temporaries = [p for p in collection.root.iterdir() if ".tmp-" in p.name]
    if leftovers:
        assert recorded <= on_disk
    else:
        assert on_disk == recorded and not temporaries
    return manifest


@pytest.fixture
def syn(isolated: Path) -> Collection:
    images, labels = clustered_digits(6000, seed=13)
    collection = make_collection(isolated / "store", "syn", images, labels)
    build_indexes(collection, [resolve_recipe("flat", len(collection.train()))], threads=1)
    return Collection.open(isolated / "store", "syn")


# --- concurrent writers --------------------------------------------------------------------

def test_three_writers_at_once_lose_nothing(syn: Collection, tmp_path: Path) -> None:
    store = syn.root.parent
    for round_ in range(2):  # the second round replaces every index while the others write
        force = ["--force"] if round_ else []
        processes = [cli(store, "build", "--collection", "syn", "--index", "hnsw", *force),
                     cli(store, "build", "--collection", "syn", "--index", "ivf", *force),
                     cli(store, "report", "--collection", "syn", "--index", "flat",
                         "--no-baseline", "--no-peers", "--repeats", "1",
                         "--latency-queries", "5", "--out", tmp_path / f"r{round_}")]
        for process in processes:
            code, _, err = finish(process)
            assert code == 0, err
        manifest = assert_consistent(syn)
        assert set(manifest["indexes"]) == {"flat", "hnsw", "ivf"}
        assert "truth-k7.parquet" in manifest["files"]


def test_writers_wait_for_the_lock_and_apply_both_changes(syn: Collection) -> None:
    store = syn.root.parent
    with locked(syn.root):
        processes = [cli(store, "build", "--collection", "syn", "--index", name)
                     for name in ("hnsw", "ivf")]
        # each builds its index, gets as far as the lock and waits there, saying so
        said = [wait_for_line(process.stderr, "waiting for another command", timeout=240)
                for process in processes]
        assert all(process.poll() is None for process in processes)
        assert set(json.loads((syn.root / "manifest.json").read_text())["indexes"]) == {"flat"}
    results = [finish(process) for process in processes]
    assert all(code == 0 for code, _, _ in results), (said, results)
    assert set(assert_consistent(syn)["indexes"]) == {"flat", "hnsw", "ivf"}


def test_only_the_temporaries_of_dead_writers_are_swept(syn: Collection) -> None:
    alive = syn.root / f".hnsw.faiss.tmp-{os.getppid()}-abcd0123"
    dead = syn.root / ".hnsw.faiss.tmp-999999999-abcd0123"  # no such process
    alive.write_bytes(b"a writer still at work")
    dead.write_bytes(b"left by a killed writer")
    assert run_cli("build", "--collection", "syn", "--index", "hnsw").exit_code == 0
    assert alive.exists() and not dead.exists()
    alive.unlink()


# --- durable writes, a full disk -----------------------------------------------------------

def test_a_full_disk_changes_nothing(syn: Collection) -> None:
    before = store_state(syn)
    code, out, err = finish(cli(syn.root.parent, "build", "--collection", "syn", "--index",
                                "flat", "--force", limit=2_000_000))  # the index is 19 MB
    assert code == 1 and out == ""
    assert "file-size limit" in one_error_line(err)
    assert store_state(syn) == before  # manifest byte-identical, no file left
    code, _, err = finish(cli(syn.root.parent, "build", "--collection", "syn", "--index",
                              "hnsw"))
    assert code == 0, err


def test_a_full_disk_while_making_a_collection_leaves_no_collection(isolated: Path,
                                                                     warm_cache: Path) -> None:
    store = isolated / "store"
    code, _, err = finish(cli(store, "build", "--split", "seed", "--index", "flat",
                              limit=5_000_000))  # the training table is 9.5 MB
    assert code == 1
    assert "file-size limit" in one_error_line(err)
    assert not (store / "seed").exists()


def test_a_manifest_that_cannot_be_written_is_kept_whole(shared, tmp_path: Path) -> None:
    from conftest import writable_copy

    collection = writable_copy(shared("noisy"), tmp_path / "store")
    before = (collection.root / "manifest.json").read_bytes()
    limit = len(before) - 200  # a new manifest is about as long: its write fails
    code, _, err = finish(cli(collection.root.parent, "tune", "--collection", "noisy",
                              "--index", "pca-hnsw", "--recall", "0.9", "--held-out", "100",
                              "--repeats", "1", limit=limit))
    assert code == 1, err
    one_error_line(err)
    assert (collection.root / "manifest.json").read_bytes() == before
    assert not [p for p in collection.root.iterdir() if ".tmp-" in p.name]


# --- killed at any moment ------------------------------------------------------------------

def answers(collection: Collection) -> tuple[np.ndarray, np.ndarray]:
    found = Collection.open(collection.root.parent, collection.name).searcher("flat").search(
        collection.test().pixels, 7)
    return found.rows, found.distances


def test_a_build_killed_at_every_step_leaves_a_collection_that_verifies(syn: Collection) -> None:
    store = syn.root.parent
    assert finish(cli(store, "build", "--collection", "syn", "--index", "hnsw"))[0] == 0
    expected = answers(syn)
    completed = False
    for step in range(1, 40):
        code, _, err = finish(cli(store, "build", "--collection", "syn", "--index", "hnsw",
                                  "--index", "ivf", "--force",
                                  env={"MNIST_ANN_KILL_AT": str(step)}))
        if code == 0:
            completed = True  # past the last step: the build ran to the end
            break
        assert code == -signal.SIGKILL, err
        manifest = assert_consistent(syn, leftovers=True)
        assert "flat" in manifest["indexes"] and "hnsw" in manifest["indexes"]
        rows, distances = answers(syn)
        np.testing.assert_array_equal(rows, expected[0])
        np.testing.assert_array_equal(distances, expected[1])
    assert completed and step > 10  # every checkpoint was a kill point
    assert set(assert_consistent(syn)["indexes"]) == {"flat", "hnsw", "ivf"}


def test_a_build_killed_at_random_moments_leaves_a_collection_that_verifies(
        syn: Collection) -> None:
    store = syn.root.parent
    expected = answers(syn)
    rng = random.Random(7)
    for _ in range(5):
        process = cli(store, "build", "--collection", "syn", "--index", "hnsw", "--force")
        time.sleep(rng.uniform(0.5, 3.0))
        process.send_signal(signal.SIGKILL)
        finish(process)
        assert_consistent(syn, leftovers=True)
        rows, distances = answers(syn)
        np.testing.assert_array_equal(rows, expected[0])
        np.testing.assert_array_equal(distances, expected[1])
    assert finish(cli(store, "build", "--collection", "syn", "--index", "hnsw"))[0] == 0
    assert "hnsw" in assert_consistent(syn)["indexes"]


# --- one line, never a traceback -----------------------------------------------------------

@pytest.mark.parametrize(("error", "fragment"), [
    (RuntimeError("Error in faiss::IndexHNSW::search at line 5: efSearch too large"),
     "FAISS refused: Error in faiss::IndexHNSW::search"),
    (MemoryError(), "out of memory"),
    (OverflowError("int too large to convert"), "unexpected OverflowError"),
    (ZeroDivisionError("division by zero"), "--debug"),
])
def test_any_error_is_one_line_and_debug_shows_the_traceback(shared, use_store, monkeypatch,
                                                             error, fragment) -> None:
    use_store(shared("syn"))
    from mnist_ann.index import searchers

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(searchers.RerankSearcher, "_search", fail)
    assert_clean_error(run_cli("query", "--collection", "syn", "--index", "hnsw"), 1, fragment)
    with pytest.raises(type(error)):
        run_cli("--debug", "query", "--collection", "syn", "--index", "hnsw")


# --- verify and drop -----------------------------------------------------------------------

def test_verify_names_each_bad_file(syn: Collection) -> None:
    good = run_cli("verify", "syn")
    assert good.exit_code == 0 and "syn: " in good.stdout and "no problems" in good.stdout
    index_file = syn.root / syn.indexes["flat"]["file"]
    data = bytearray(index_file.read_bytes())
    data[100] ^= 1
    index_file.write_bytes(bytes(data))
    (syn.root / "test.parquet").unlink()
    result = run_cli("verify", "syn", "--json")
    assert result.exit_code == 1
    problems = json.loads(result.stdout)[0]["problems"]
    assert {p["file"]: p["problem"] for p in problems} == {
        index_file.name: "fails its checksum", "test.parquet": "missing"}
    line = assert_clean_error(result, 1, "2 files fail verification")
    assert index_file.name in line and "test.parquet" in line


def test_drop_an_index_and_a_collection(syn: Collection) -> None:
    assert run_cli("build", "--collection", "syn", "--index", "hnsw").exit_code == 0
    hnsw = Collection.open(syn.root.parent, "syn").indexes["hnsw"]
    result = run_cli("drop", "syn", "--index", "hnsw")
    assert result.exit_code == 0, result.stderr
    assert not (syn.root / hnsw["file"]).exists() and not (syn.root / hnsw["record"]).exists()
    assert set(assert_consistent(syn)["indexes"]) == {"flat"}
    assert_clean_error(run_cli("drop", "syn", "--index", "hnsw"), 1, "has no index 'hnsw'")
    assert run_cli("drop", "syn").exit_code == 0
    assert not syn.root.exists()
    assert_clean_error(run_cli("drop", "syn"), 1, "no collection 'syn'")


def test_the_remedy_for_a_damaged_table_works_as_written(isolated: Path,
                                                          warm_cache: Path) -> None:
    assert run_cli("build", "--split", "seed", "--test-size", "0.2", "--random-state", "3",
                   "--collection", "mine", "--index", "flat").exit_code == 0
    table = isolated / "store" / "mine" / "train.parquet"
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 0xFF
    table.write_bytes(bytes(data))
    line = assert_clean_error(run_cli("query", "--collection", "mine"), 1, "fails its checksum")
    commands = re.findall(r"`mnist-ann ([^`]+)`", line)
    assert [c.split()[0] for c in commands] == ["drop", "build"], line
    for command in commands:  # followed to the letter
        result = run_cli(*command.split())
        assert result.exit_code == 0, (command, result.stderr)
    summary = json.loads(run_cli("query", "--collection", "mine", "--json").stdout)
    assert summary["n"] == 14_000 and summary["accuracy"] > 0.95
