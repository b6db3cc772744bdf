"""How k-NN's cost and accuracy grow with the training set: exact search over 60,000 to four
million training digits (the standard split plus deformed copies), in 1 to 8 shards, searched
by 1 or 2 Dask worker processes on this machine.

    python bench/bench_scale.py [--sizes 60000,240000,1020000,4020000] [--queries 500]

For each size it makes the collection `standard-augN` in a scratch store (`build --augment`)
and builds two exact kinds, unsharded and in S shards: `flat` (float32, 3,136 bytes a row)
and `bytes` (`SQ8_direct`: each pixel its own byte, 784 bytes a row, certified exact like
flat). Flat is skipped above `--flat-up-to` rows, where it would not fit in memory; unsharded
bytes is then the reference. It measures on a seeded sample of the standard test queries:

- the build's seconds (from the manifest);
- queries/s of the batch on a LocalCluster of W workers (one thread each, as Dask runs them),
  after a warm-up that loads every shard into the workers' caches; the single-query p50;
- merge seconds (the exact merge on the client) and the rest of the batch's wall time beyond
  the slowest worker's searching (scatter, scheduling, gathering: `transfer_s`);
- each worker's peak RSS;
- accuracy of the k=7 vote, and `exact`: whether every neighbour list equals the reference's
  (unsharded flat, or unsharded bytes where flat is skipped).

Rows for 4 and 8 workers are *modelled*, not measured (this machine has 2 cores): the shards'
measured search times dealt to W workers, plus the measured merge and transfer time.
Writes bench/results/scale.csv and bench/results/scale.png.
"""

from __future__ import annotations

import argparse
import csv
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mnist_ann.api import Collection
from mnist_ann.classify import vote
from mnist_ann.cluster import connected, search_shard
from mnist_ann.data.mnist import Split, load_mnist
from mnist_ann.index.build import build_indexes
from mnist_ann.index.recipes import resolve_recipe, with_shards
from mnist_ann.index.sharded import merge_shards
from mnist_ann.runtime import faiss_threads
from mnist_ann.store.manage import create_collection

COLUMNS = ["train_rows", "kind", "shards", "workers", "measured", "build_seconds", "queries",
           "queries_per_second", "single_p50_ms", "merge_s", "transfer_s",
           "peak_worker_rss_mb", "accuracy", "exact"]
RESULTS = Path(__file__).parent / "results"
KINDS = {"flat": "Flat", "bytes": "SQ8_direct"}


def timed_search(task, queries, k, params):
    """On a worker: one shard's search and how long it took there."""
    started = time.perf_counter()
    found = search_shard(task, queries, k, params)
    return found, time.perf_counter() - started


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: per address space, so a worker's own)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_cluster(collection: Collection, name: str, queries: np.ndarray, workers: int,
                    truth, labels: np.ndarray) -> tuple[dict, list[float]]:
    with connected(f"local:{workers}") as cluster:
        searcher = cluster.searcher(collection, name)
        tasks = [shard.task for shard in searcher.shards]
        offsets = [start for start, _ in searcher.ranges]
        searcher.search(queries[:10], 7)  # every shard loaded into a worker's cache
        client = cluster.client
        started = time.perf_counter()
        homes = cluster.homes(len(tasks))
        results = client.gather([cluster.submit(timed_search, task, queries, 7, {},
                                                 workers=homes[number])
                                 for number, task in enumerate(tasks)])
        merge_started = time.perf_counter()
        found = merge_shards([part for part, _ in results], offsets, 7)
        merge_seconds = time.perf_counter() - merge_started
        wall = time.perf_counter() - started
        shard_seconds = [seconds for _, seconds in results]
        slowest_worker = max(shard_seconds) if workers >= len(tasks) else \
            sum(shard_seconds) / workers
        singles = []
        for query in queries[:20]:
            one = time.perf_counter()
            searcher.search(query[None], 7)
            singles.append(time.perf_counter() - one)
        rss = max(client.run(peak_rss_mb).values())
    return {"queries_per_second": len(queries) / wall,
            "single_p50_ms": 1e3 * statistics.median(singles), "merge_s": merge_seconds,
            "transfer_s": max(0.0, wall - slowest_worker - merge_seconds),
            "peak_worker_rss_mb": rss, "accuracy": accuracy(collection, found, labels),
            "exact": bool(np.array_equal(found.rows, truth.rows))}, shard_seconds


def accuracy(collection: Collection, found, labels: np.ndarray) -> float:
    """The k=7 vote's accuracy on the neighbours found."""
    train_labels = collection.train().labels
    classes = np.unique(train_labels)
    return float(np.mean(vote(train_labels[found.rows], found.distances, classes) == labels))


def modelled(row: dict, shard_seconds: list[float], workers: int, n: int) -> dict:
    dealt = [0.0] * workers
    for seconds in sorted(shard_seconds, reverse=True):
        dealt[dealt.index(min(dealt))] += seconds
    wall = max(dealt) + row["merge_s"] + row["transfer_s"]
    return {**row, "workers": workers, "measured": "modelled", "queries_per_second": n / wall,
            "single_p50_ms": None, "peak_worker_rss_mb": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="60000,240000,1020000,4020000",
                        help="training rows: multiples of 60,000")
    parser.add_argument("--flat-up-to", type=int, default=1_020_000,
                        help="skip flat float32 above this many training rows")
    parser.add_argument("--shards", default="2,4,8")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--store", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.csv")
    parser.add_argument("--replot", action="store_true",
                        help="only draw the plot again from the CSV")
    args = parser.parse_args()
    if args.replot:
        with open(args.out) as handle:
            rows = [{**row, "train_rows": int(row["train_rows"]),
                     "queries_per_second": float(row["queries_per_second"]),
                     "accuracy": float(row["accuracy"])} for row in csv.DictReader(handle)]
        for row in rows:
            row["shards"] = int(row["shards"])
            row["exact"] = row["exact"] == "True"
            row.setdefault("kind", "flat")
        plot(rows, args.out.with_suffix(".png"))
        return
    store = args.store or Path(tempfile.mkdtemp(prefix="mnist-ann-scale-"))
    dataset = load_mnist("auto")
    shard_counts = [int(s) for s in args.shards.split(",")]
    rows = []
    for size in map(int, args.sizes.split(",")):
        copies = size // 60_000 - 1
        split = Split.make("standard", augment=copies, augment_seed=0 if copies else None)
        if not (store / split.default_name).exists():
            create_collection(store, split.default_name, dataset, split, print)
        collection = Collection.open(store, split.default_name)
        n_train = collection.manifest["rows"]["train"]
        kinds = [kind for kind in KINDS if kind != "flat" or n_train <= args.flat_up_to]
        recipes = [with_shards(resolve_recipe(f"{kind}{shards}={KINDS[kind]}", n_train), shards)
                   for kind in kinds for shards in [1, *shard_counts]]
        build_indexes(collection, recipes, threads=2, log=print)
        collection = Collection.open(store, split.default_name)
        test = collection.test()
        sample = np.sort(np.random.default_rng(0).choice(len(test), args.queries, replace=False))
        queries, labels = test.pixels[sample], test.labels[sample]
        truth = None
        for kind in kinds:
            name = f"{kind}1"
            whole = collection.searcher(name)
            with faiss_threads(2):
                started = time.perf_counter()
                found = whole.search(queries, 7)
                seconds = time.perf_counter() - started
            truth = found if truth is None else truth
            rows.append({"train_rows": n_train, "kind": kind, "shards": 1,
                         "workers": "1 process, 2 threads", "measured": "measured",
                         "build_seconds": collection.indexes[name]["build_seconds"],
                         "queries": len(queries), "queries_per_second": len(queries) / seconds,
                         "single_p50_ms": None, "merge_s": 0.0, "transfer_s": 0.0,
                         "peak_worker_rss_mb": peak_rss_mb(),
                         "accuracy": accuracy(collection, found, labels),
                         "exact": bool(np.array_equal(found.rows, truth.rows))})
            print(rows[-1])
            del whole
            for shards in shard_counts:
                name = f"{kind}{shards}"
                for workers in map(int, args.workers.split(",")):
                    measured, shard_seconds = measure_cluster(collection, name, queries,
                                                              workers, truth, labels)
                    row = {"train_rows": n_train, "kind": kind, "shards": shards,
                           "workers": workers, "measured": "measured",
                           "build_seconds": collection.indexes[name]["build_seconds"],
                           "queries": len(queries), **measured}
                    rows.append(row)
                    print(row)
                for workers in (4, 8):
                    if workers <= shards:
                        rows.append(modelled(row, shard_seconds, workers, len(queries)))
        del truth, collection
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def plot(rows: list[dict], path: Path) -> None:
    from mnist_ann.render.plots import plt, save_figure

    figure, (speed, accuracy) = plt.subplots(1, 2, figsize=(12, 4.8))
    groups: dict = {}
    for row in rows:
        key = (row.get("kind", "flat"), row["shards"], row["workers"], row["measured"])
        groups.setdefault(key, []).append(row)
    for (kind, shards, workers, measured), group in sorted(groups.items(), key=str):
        style = "--" if measured == "modelled" else "-" if kind == "flat" else ":"
        label = (f"{kind}, unsharded, one process, 2 threads" if shards == 1 else
                 f"{kind}, {shards} shards, {workers} worker{'s' if str(workers) != '1' else ''}"
                 + (" (modelled)" if measured == "modelled" else ""))
        speed.plot([r["train_rows"] for r in group], [r["queries_per_second"] for r in group],
                   style, marker="o", label=label)
    speed.set_xscale("log")
    speed.set_yscale("log")
    speed.set_xlabel("training rows (standard split + deformed copies)")
    speed.set_ylabel("queries per second (batch, log)")
    speed.set_title("Exact k-NN cost against training size (flat: float32; bytes: SQ8_direct)")
    speed.grid(True, which="both", alpha=0.3)
    speed.legend(fontsize=7)
    exact = sorted({r["train_rows"]: r for r in reversed(rows) if r["shards"] == 1}.values(),
                   key=lambda r: r["train_rows"])
    accuracy.plot([r["train_rows"] for r in exact], [r["accuracy"] for r in exact], marker="o")
    accuracy.set_xscale("log")
    accuracy.set_xlabel("training rows")
    accuracy.set_ylabel("accuracy of the k=7 vote (sampled test queries)")
    accuracy.set_title("Does a bigger deformed training set help?")
    accuracy.grid(True, which="both", alpha=0.3)
    save_figure(figure, path)


if __name__ == "__main__":
    main()
