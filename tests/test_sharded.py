"""Sharded indexes: the exact merge, shards that together equal the unsharded index, a
tampered shard refused, and the same search on a real Dask LocalCluster (two worker
processes on loopback), a worker killed mid-query included."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_clean_error, clustered_digits, make_collection, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from mnist_ann.api import Collection, Store
from mnist_ann.cluster import connected
from mnist_ann.index.build import build_indexes
from mnist_ann.index.neighbours import MISSING, Neighbours
from mnist_ann.index.recipes import resolve_recipe, with_shards
from mnist_ann.index.sharded import merge_shards, shard_ranges

# --- the merge ------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.data())
def test_the_merge_is_the_exact_order_over_every_shard(data) -> None:
    sizes = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=5))
    n_queries = data.draw(st.integers(1, 4))
    k = data.draw(st.integers(1, sum(sizes)))
    # few distinct distances: many ties, across shard boundaries
    everything = np.array(data.draw(st.lists(
        st.lists(st.integers(0, 3), min_size=sum(sizes), max_size=sum(sizes)),
        min_size=n_queries, max_size=n_queries)), dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    parts = []
    for offset, size in zip(offsets, sizes, strict=True):
        local = everything[:, offset:offset + size]
        width = min(k, size)  # each shard's own exact top k, by (distance, local row)
        order = np.lexsort((np.broadcast_to(np.arange(size), local.shape), local),
                           axis=1)[:, :width]
        parts.append(Neighbours(order, np.take_along_axis(local, order, 1)))
    arrival = data.draw(st.permutations(range(len(sizes))))  # shards answer in any order
    merged = merge_shards([parts[i] for i in arrival], [int(offsets[i]) for i in arrival], k)
    rows = np.broadcast_to(np.arange(sum(sizes)), everything.shape)
    expected = np.lexsort((rows, everything), axis=1)[:, :k]
    np.testing.assert_array_equal(merged.rows, expected)
    np.testing.assert_array_equal(merged.distances, np.take_along_axis(everything, expected, 1))


def test_missing_neighbours_stay_last() -> None:
    parts = [Neighbours(np.array([[0, -1]]), np.array([[5, MISSING]])),
             Neighbours(np.array([[1, 0]]), np.array([[2, 9]]))]
    merged = merge_shards(parts, [0, 2], 3)
    np.testing.assert_array_equal(merged.rows, [[3, 0, 2]])


def test_shard_ranges_cover_the_rows_contiguously() -> None:
    assert shard_ranges(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_ranges(5, 5)[-1] == (4, 5)
    with pytest.raises(Exception, match="between 1 and the 5"):
        shard_ranges(5, 6)


# --- sharded indexes in a collection -------------------------------------------------------

@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Collection:
    """A synthetic collection with flat and IVF, each unsharded and in 3 shards, and flat's
    pixels as bytes (SQ8_direct) in 3 shards."""
    store = tmp_path_factory.mktemp("sharded-store")
    images, labels = clustered_digits(4000, seed=31)
    images[::7] = images[::7] // 64 * 64  # coarse pixels: many equal distances
    collection = make_collection(store, "shd", images, labels)
    n = len(collection.train())
    recipes = [resolve_recipe("flat", n), resolve_recipe("ivf64=IVF64,Flat", n),
               with_shards(resolve_recipe("flat3=Flat", n), 3),
               with_shards(resolve_recipe("ivf64s3=IVF64,Flat", n), 3),
               with_shards(resolve_recipe("bytes3=SQ8_direct", n), 3)]
    build_indexes(collection, recipes, threads=1)
    return Collection.open(store, "shd")


def test_sharded_flat_equals_flat_ties_included(sharded: Collection) -> None:
    queries = sharded.test().pixels
    flat = sharded.searcher("flat").search(queries, 7)
    shards = sharded.searcher("flat3")
    assert [shard.ntotal for shard in shards.shards] == [1200, 1200, 1200]
    found = shards.search(queries, 7)
    np.testing.assert_array_equal(found.rows, flat.rows)
    np.testing.assert_array_equal(found.distances, flat.distances)
    assert found.stats == {"shards": 3}
    assert (np.diff(flat.distances, axis=1) == 0).any()  # the ties are there to be broken


def test_shards_of_bytes_equal_flat_in_a_quarter_of_its_memory(sharded: Collection) -> None:
    queries = sharded.test().pixels
    flat = sharded.searcher("flat").search(queries, 7)
    shards = sharded.searcher("bytes3")
    found = shards.search(queries, 7)
    np.testing.assert_array_equal(found.rows, flat.rows)
    np.testing.assert_array_equal(found.distances, flat.distances)
    assert all(shard.space._float32 is None for shard in shards.shards)  # no float32 copy
    sizes = {name: sum((sharded.root / shard.file).stat().st_size
                       for shard in sharded.shard_files(name)) for name in ("flat3", "bytes3")}
    assert sizes["bytes3"] < sizes["flat3"] / 3.9


def test_ivf_shards_filled_from_one_trained_index_equal_the_unsharded_ivf(sharded) -> None:
    queries = sharded.test().pixels
    for nprobe in (1, 4, 64):
        whole = sharded.searcher("ivf64").search(queries, 7, {"nprobe": nprobe})
        shards = sharded.searcher("ivf64s3").search(queries, 7, {"nprobe": nprobe})
        np.testing.assert_array_equal(shards.rows, whole.rows)
        np.testing.assert_array_equal(shards.distances, whole.distances)


def test_a_sharded_index_is_recorded_shard_by_shard(sharded: Collection) -> None:
    entry = sharded.indexes["flat3"]
    listed = json.loads((sharded.root / entry["file"]).read_text())["shards"]
    assert [shard["rows"] for shard in listed] == [[0, 1200], [1200, 2400], [2400, 3600]]
    for shard in listed:
        assert sharded.manifest["files"][shard["file"]]["sha256"] == shard["sha256"]
    assert entry["shard_files"] == [shard["file"] for shard in listed]
    assert run_cli("verify", "shd", "--store", sharded.root.parent).exit_code == 0


def test_a_tampered_shard_is_refused(sharded: Collection, tmp_path: Path) -> None:
    from conftest import writable_copy

    copy = writable_copy(sharded, tmp_path / "store")
    second = copy.indexes["flat3"]["shard_files"][1]
    data = bytearray((copy.root / second).read_bytes())
    data[-100] ^= 1
    (copy.root / second).write_bytes(bytes(data))
    result = run_cli("query", "--store", copy.root.parent, "--collection", "shd", "--index",
                     "flat3", "-q")
    assert_clean_error(result, 1, "fails its checksum")
    assert second in result.stderr
    verify = run_cli("verify", "shd", "--store", copy.root.parent)
    assert verify.exit_code == 1 and second in verify.output + verify.stderr


def test_sharding_is_refused_where_it_does_not_apply(sharded: Collection) -> None:
    with pytest.raises(Exception, match="not sharded"):
        with_shards(resolve_recipe("exact-pca", 3600), 2)
    assert_clean_error(run_cli("build", "--store", sharded.root.parent, "--collection", "shd",
                               "--index", "flat", "--cluster", "local:2"), 2,
                       "--cluster builds the shards")
    assert_clean_error(run_cli("query", "--store", sharded.root.parent, "--collection", "shd",
                               "--index", "flat", "--cluster", "nowhere"), 2, "local:W")


# --- on a Dask cluster ------------------------------------------------------------------------

def test_a_local_cluster_builds_the_same_shards_and_searches_them_exactly(
        sharded: Collection, tmp_path: Path) -> None:
    from conftest import writable_copy

    copy = writable_copy(sharded, tmp_path / "store")
    store = copy.root.parent
    result = run_cli("build", "--store", store, "--collection", "shd", "--index",
                     "ivf64s3=IVF64,Flat", "--shards", "3", "--cluster", "local:2", "--force",
                     "-q")
    assert result.exit_code == 0, result.stderr
    rebuilt = Collection.open(store, "shd")
    assert rebuilt.indexes["ivf64s3"]["shard_files"] == \
        sharded.indexes["ivf64s3"]["shard_files"]  # the same bytes: named by content
    flat = sharded.classifier("flat").classify(sharded.test().pixels)
    out = tmp_path / "out.csv"
    queried = run_cli("query", "--store", store, "--collection", "shd", "--index", "flat3",
                      "--cluster", "local:2", "--output", out, "--json", "-q")
    assert queried.exit_code == 0, queried.stderr
    summary = json.loads(queried.stdout)
    assert summary["accuracy"] == pytest.approx(np.mean(flat.predictions ==
                                                        sharded.test().labels))
    assert summary["shards"] == {"shards": 3}
    import pandas as pd

    written = pd.read_csv(out)
    assert (written["predicted"].to_numpy() == flat.predictions).all()


def test_each_worker_keeps_its_own_shards(sharded: Collection) -> None:
    from mnist_ann.cluster import cached_shards

    seed = Store(sharded.root.parent)["shd"]
    with connected("local:2") as cluster:
        classifier = seed.classifier("flat3", cluster=cluster)
        for _ in range(3):
            classifier.neighbours(sharded.test().pixels[:50])
        held = list(cluster.client.run(cached_shards).values())
    assert sorted(map(len, held)) == [1, 2]  # 3 shards dealt round 2 workers, none twice
    assert set(held[0]).isdisjoint(held[1])


def test_a_worker_killed_mid_query_changes_nothing(sharded: Collection) -> None:
    queries = np.tile(sharded.test().pixels, (100, 1))  # 40,000 queries: about 3 s here
    expected = sharded.searcher("flat").search(queries[:400], 7)
    seed = Store(sharded.root.parent)["shd"]
    with connected("local:2") as cluster:
        classifier = seed.classifier("flat3", cluster=cluster)
        np.testing.assert_array_equal(classifier.neighbours(queries[:400]).rows, expected.rows)
        pids = list(cluster.client.run(os.getpid).values())
        answer: dict = {}
        searching = threading.Thread(
            target=lambda: answer.update(found=classifier.neighbours(queries)))
        searching.start()
        time.sleep(0.5)
        assert searching.is_alive()  # the kill lands mid-query
        os.kill(pids[0], signal.SIGKILL)
        searching.join(timeout=240)
        assert "found" in answer, "the query did not finish"
        found = answer["found"]
        np.testing.assert_array_equal(found.rows[:400], expected.rows)
        np.testing.assert_array_equal(found.rows[400:800], expected.rows)


def test_an_unreachable_cluster_is_one_line(sharded: Collection) -> None:
    result = run_cli("query", "--store", sharded.root.parent, "--collection", "shd",
                     "--index", "flat3", "--cluster", "tcp://127.0.0.1:9", "-q")
    assert_clean_error(result, 1, "cannot reach the Dask cluster")
    unsharded = run_cli("query", "--store", sharded.root.parent, "--collection", "shd",
                        "--index", "flat", "--cluster", "local:1", "-q")
    assert_clean_error(unsharded, 1, "index 'flat' is not sharded")


# --- the real seed split ----------------------------------------------------------------------

@pytest.mark.slow
def test_sharded_flat_on_a_local_cluster_gives_the_study_exactly(seed_collection, seed_flat,
                                                                  tmp_path: Path) -> None:
    from conftest import writable_copy

    copy = writable_copy(seed_collection, tmp_path / "store")
    store = copy.root.parent
    built = run_cli("build", "--store", store, "--collection", "seed", "--index",
                    "shard4=Flat", "--shards", "4", "--cluster", "local:2", "-q")
    assert built.exit_code == 0, built.stderr
    out = tmp_path / "shard4.parquet"
    result = run_cli("query", "--store", store, "--collection", "seed", "--index", "shard4",
                     "--cluster", "local:2", "--output", out, "--json", "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["accuracy"] == 0.9687142857142857
    import pyarrow.parquet as pq

    written = pq.read_table(out).to_pydict()
    ids = np.array(written["neighbors"])
    np.testing.assert_array_equal(ids, seed_flat.neighbour_ids)


def test_dropping_a_sharded_index_removes_every_shard(sharded: Collection, tmp_path) -> None:
    from conftest import writable_copy

    copy = writable_copy(sharded, tmp_path / "store")
    owned = [copy.indexes["flat3"]["file"], *copy.indexes["flat3"]["shard_files"]]
    result = run_cli("drop", "shd", "--index", "flat3", "--store", copy.root.parent)
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((copy.root / "manifest.json").read_text())
    assert not any((copy.root / name).exists() or name in manifest["files"] for name in owned)
    assert run_cli("verify", "shd", "--store", copy.root.parent).exit_code == 0


def test_a_shard_reads_only_the_row_groups_of_its_rows(tmp_path, monkeypatch) -> None:
    import pyarrow.parquet as pq

    from mnist_ann.data import tables

    monkeypatch.setattr(tables, "ROW_GROUP_ROWS", 1000)
    images, labels = clustered_digits(4000, seed=5)
    collection = make_collection(tmp_path / "store", "groups", images, labels)
    assert pq.ParquetFile(collection.root / "train.parquet").metadata.num_row_groups == 4
    asked: list = []
    real = pq.ParquetFile.read_row_groups

    def spy(self, groups, *args, **kwargs):
        asked.append(list(groups))
        return real(self, groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    rows = collection.train_rows(1200, 2400)
    assert asked == [[1, 2]]
    whole = collection.train()
    np.testing.assert_array_equal(rows.pixels, whole.pixels[1200:2400])
    np.testing.assert_array_equal(rows.ids, whole.ids[1200:2400])


def test_a_shard_checks_only_the_parts_it_reads(tmp_path, monkeypatch) -> None:
    """Each part (row group) of the training table has its own sha256 in the manifest: a
    reader of some rows checks theirs and the footer's, and decodes the checked bytes."""
    from mnist_ann.data import tables

    monkeypatch.setattr(tables, "ROW_GROUP_ROWS", 1000)
    images, labels = clustered_digits(4000, seed=5)
    collection = make_collection(tmp_path / "store", "groups", images, labels)
    path = collection.root / "train.parquet"
    record = collection.manifest["files"]["train.parquet"]
    n = collection.manifest["rows"]["train"]
    assert [part["rows"] for part in record["parts"]] == [[0, 1000], [1000, 2000],
                                                          [2000, 3000], [3000, n]]
    whole = collection.train().pixels.copy()
    pristine = path.read_bytes()

    def tampered_in(part: int) -> Collection:
        data = bytearray(pristine)
        data[record["parts"][part]["offset"] + record["parts"][part]["bytes"] // 2] ^= 1
        path.write_bytes(bytes(data))
        return Collection.open(tmp_path / "store", "groups")

    rows = tampered_in(0).train_rows(1200, 2400)  # part 0 is not read: its change unseen
    np.testing.assert_array_equal(rows.pixels, whole[1200:2400])
    with pytest.raises(Exception, match="fails the checksum of its bytes"):
        tampered_in(1).train_rows(1200, 2400)
    with pytest.raises(Exception, match="fails its checksum"):
        tampered_in(0).train()  # the whole table is still checked whole

    path.write_bytes(pristine)
    manifest_path = collection.root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for broken in ({"parts": "nope"}, {"parts": record["parts"][:2]},
                   {"tail": {**record["tail"], "bytes": 10**12}}):
        manifest["files"]["train.parquet"] = {**record, **broken}
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(Exception, match="parts"):
            Collection.open(tmp_path / "store", "groups").train_rows(0, 10)
    manifest["files"]["train.parquet"] = {key: value for key, value in record.items()
                                          if key not in ("parts", "tail")}
    manifest_path.write_text(json.dumps(manifest))  # a table recorded before parts existed
    older = Collection.open(tmp_path / "store", "groups")
    np.testing.assert_array_equal(older.train_rows(1200, 2400).pixels, whole[1200:2400])
    path.write_bytes(bytes(b ^ 1 if i == len(pristine) // 4 else b
                           for i, b in enumerate(pristine)))
    with pytest.raises(Exception, match="fails its checksum"):
        Collection.open(tmp_path / "store", "groups").train_rows(3000, 3100)


def test_the_report_searches_sharded_indexes_on_the_cluster(sharded: Collection,
                                                            tmp_path: Path) -> None:
    """`report --cluster` measures a sharded index on the workers: exact, as in-process."""
    from mnist_ann.cluster import cached_shards
    from mnist_ann.evaluation.sweep import SweepSettings, evaluate

    settings = SweepSettings(repeats=1, latency_queries=20)
    with connected("local:2") as cluster:
        evaluation = evaluate(sharded, ["flat3", "ivf64"], settings, baseline=False,
                              peers=False, cluster=cluster)
        held = [shard for shards in cluster.client.run(cached_shards).values()
                for shard in shards]
    expected = {shard.sha256 for shard in sharded.shard_files("flat3")}
    assert set(held) == expected  # the workers searched flat3's shards, each once
    rows = [row for row in evaluation.rows if row["index"] == "flat3"]
    assert rows and all(row["recall"] == 1.0 for row in rows)
    assert evaluation.meta["settings"]["on_cluster"] == ["flat3"]
    cli = run_cli("report", "--store", sharded.root.parent, "--collection", "shd", "--index",
                  "flat3", "--cluster", "local:1", "--no-baseline", "--no-peers", "--repeats",
                  "1", "--latency-queries", "10", "--out", tmp_path / "report", "--json", "-q")
    assert cli.exit_code == 0, cli.stderr
    assert json.loads(cli.stdout)["meta"]["settings"]["on_cluster"] == ["flat3"]
    assert "on a Dask cluster" in (tmp_path / "report" / "report.md").read_text()
    assert_clean_error(run_cli("report", "--store", sharded.root.parent, "--collection", "shd",
                               "--index", "flat", "--cluster", "local:1", "--out",
                               tmp_path / "other"), 2, "--cluster searches sharded indexes")
