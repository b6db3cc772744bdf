"""Start-up and loading, before and after, in one run: `--help`, a one-image query, loading a
classifier (time and peak memory), and whether `query --json` reports the search's own speed.

    python bench/bench_load.py [--store indexes] [--collection seed] [--before REV]

Every measurement runs in fresh processes (median of --repeats). With --before REV, the same
commands also run on that git revision of mnist-ann (checked out into a temporary worktree,
with a collection of its own format that it builds itself from the same MNIST cache), and
the ratios are printed. Targets (issue 13): --help < 0.5 s, a one-image query < 2 s, a
classifier loaded in < 1 s with peak RSS < 2x (index file + training pixels).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mnist_ann import Store
from mnist_ann.evaluation.timing import WARM_UP_QUERIES, time_batch
from mnist_ann.machine import describe_machine

ROOT = Path(__file__).resolve().parent.parent
LOAD_INDEXES = ("flat", "hnsw", "ivf", "pca-hnsw", "exact-pca", "deskew-pca-ivf")

# loads a classifier in a fresh process, then classifies 100 test images; prints the load's
# seconds, the peak RSS (MB) after loading and after that first batch
LOAD_NEW = """
import resource, sys, time
started = time.perf_counter()
from mnist_ann import Store
collection = Store(sys.argv[1])[sys.argv[2]]
clf = collection.classifier(sys.argv[3])
seconds = time.perf_counter() - started
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
clf.classify(collection.test().pixels[:100])
print(seconds, loaded, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""
LOAD_OLD = """
import resource, sys, time
from pathlib import Path
started = time.perf_counter()
from mnist_ann.search import KnnIndex
from mnist_ann.store import Collection
collection = Collection.open(Path(sys.argv[1]), sys.argv[2])
knn = KnnIndex(collection, sys.argv[3])
seconds = time.perf_counter() - started
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
knn.classify(collection.test().pixels[:100])
print(seconds, loaded, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(command: list[str], env: dict, cwd: Path = ROOT) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MB) and stdout of one process (run in `cwd`, whose mnist_ann
    package `python -m` finds first)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, cwd=cwd)
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed ({status})")
    return seconds, usage.ru_maxrss / 1024, out


def median_run(command: list[str], env: dict, repeats: int,
               cwd: Path = ROOT) -> tuple[float, float, str]:
    runs = [run(command, env, cwd) for _ in range(repeats)]
    return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs),
            runs[-1][2])


def measure(label: str, package: Path, store: Path, collection: str, one_image: Path,
            load_script: str, indexes: list[str], repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(package)}
    cli = [sys.executable, "-m", "mnist_ann"]
    results: dict = {}
    log(f"{label}: --help")
    results["help"] = median_run([*cli, "--help"], env, repeats, package)[0]
    log(f"{label}: query of one image with flat")
    results["one_image"] = median_run([*cli, "query", "--store", str(store), "--collection",
                                       collection, "--index", "flat", "--input",
                                       str(one_image), "--json", "--quiet"], env, repeats,
                                      package)[:2]
    results["load"] = {}
    for name in indexes:
        log(f"{label}: loading a classifier for {name}")
        runs = [run([sys.executable, "-c", load_script, str(store), collection, name], env,
                    package)[2] for _ in range(repeats)]
        seconds, rss, first = zip(*(map(float, line.split()) for line in runs), strict=True)
        results["load"][name] = (statistics.median(seconds), statistics.median(rss),
                                 statistics.median(first))
    return results


@contextlib.contextmanager
def checked_out(revision: str, scratch: Path) -> Iterator[Path]:
    """A temporary git worktree of `revision`, removed on leaving."""
    worktree = scratch / "before"
    subprocess.run(["git", "worktree", "add", "--detach", str(worktree), revision], cwd=ROOT,
                   check=True, capture_output=True)
    try:
        yield worktree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT,
                       check=False, capture_output=True)


def old_collection(worktree: Path, store: Path, collection: str, split: dict,
                   indexes: list[str] = ("flat",)) -> None:
    """The old revision builds the same split and indexes in its own format."""
    args = ["--split", split["kind"]]
    if split["kind"] == "seed":
        args += ["--test-size", str(split["test_size"]), "--random-state",
                 str(split["random_state"])]
    env = {**os.environ, "PYTHONPATH": str(worktree)}
    recipes = [part for name in indexes for part in ("--index", name)]
    subprocess.run([sys.executable, "-m", "mnist_ann", "build", *args, "--collection",
                    collection, *recipes, "--store", str(store), "--quiet"],
                   env=env, check=True, cwd=worktree, stdout=subprocess.DEVNULL)


def user_sees_what_bench_sees(collection, store: Path, repeats: int) -> list[tuple]:
    """`query --json`'s queries/s beside the timing harness's, same classifier settings."""
    rows = []
    pixels = collection.test().pixels
    for name, threads in (("exact-pca", 2), ("deskew-pca-ivf", 1), ("flat", 2)):
        if name not in collection.indexes:
            continue
        classifier = collection.classifier(name, threads=threads)
        _, times = time_batch(lambda c=classifier: c.classify(pixels),
                              lambda c=classifier: c.classify(pixels[:WARM_UP_QUERIES]), repeats)
        bench_qps = len(pixels) / statistics.median(times)
        command = [sys.executable, "-m", "mnist_ann", "query", "--store", str(store),
                   "--collection", collection.name, "--index", name, "--threads",
                   str(threads), "--json", "--quiet"]
        runs = [run(command, dict(os.environ)) for _ in range(max(1, repeats // 2))]
        summaries = [json.loads(out) for _, _, out in runs]
        cli_qps = statistics.median(s["queries_per_second"] for s in summaries)
        wall = statistics.median(seconds for seconds, _, _ in runs)
        rows.append((name, threads, bench_qps, cli_qps, wall,
                     statistics.median(s["seconds"] for s in summaries),
                     statistics.median(s["load_seconds"] for s in summaries)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--before", default=None, help="git revision to compare with")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    collection = Store(args.store)[args.collection]
    store = collection.root.parent.resolve()
    machine = describe_machine()
    print(f"machine: {machine['cpu']} ({machine['cores']} cores), faiss {machine['faiss']} "
          f"({machine['faiss_simd']}), numpy {machine['numpy']}, Python {machine['python']}; "
          f"fresh processes, median of {args.repeats}")
    with tempfile.TemporaryDirectory(prefix="bench-load-") as scratch:
        one_image = Path(scratch) / "one.npy"
        np.save(one_image, collection.test().pixels[:1])
        indexes = [name for name in LOAD_INDEXES if name in collection.indexes]
        after = measure("after", ROOT, store, args.collection, one_image, LOAD_NEW, indexes,
                        args.repeats)
        before = None
        if args.before:
            with checked_out(args.before, Path(scratch)) as worktree:
                old_store = Path(scratch) / "store"
                log(f"before ({args.before}): building its own collection with flat")
                old_collection(worktree, old_store, args.collection,
                               collection.manifest["split"])
                before = measure(f"before ({args.before})", worktree, old_store,
                                 args.collection, one_image, LOAD_OLD, ["flat"], args.repeats)
    pixels_mb = collection.manifest["rows"]["train"] * 784 / 1e6
    print("\n| measurement | target | after |" + (" before | before / after |"
                                                  if before else ""))
    print("|---|---|---|" + ("---|---|" if before else ""))

    def line(name: str, target: str, new: float, old: float | None, unit: str) -> None:
        cells = f"| {name} | {target} | {new:.2f} {unit} |"
        if before:
            cells += f" {old:.2f} {unit} | {old / new:.1f}x |" if old else " | |"
        print(cells)

    line("`mnist-ann --help`", "< 0.5 s", after["help"], before and before["help"], "s")
    line("one-image `query --index flat` (whole command)", "< 2 s", after["one_image"][0],
         before and before["one_image"][0], "s")
    line("  its peak RSS", "", after["one_image"][1], before and before["one_image"][1], "MB")
    for name, (seconds, rss, first) in after["load"].items():
        index_mb = collection.indexes[name]["bytes"] / 1e6
        old = before["load"].get(name) if before else None
        bound = 2 * (index_mb + pixels_mb)
        line(f"load classifier `{name}`", "< 1 s", seconds, old and old[0], "s")
        line(f"  peak RSS loaded (2 x (index {index_mb:.0f} + pixels {pixels_mb:.0f} MB) = "
             f"{bound:.0f} MB)", f"< {bound:.0f} MB", rss, old and old[1], "MB")
        line("  peak RSS after its first 100 queries", f"< {bound:.0f} MB", first,
             old and old[2], "MB")
    print("\n`query --json` against the timing harness, the 14,000 test queries:")
    print("| index | threads | harness queries/s | `query --json` queries/s | whole command s "
          "| its search s | its load s |")
    print("|---|---|---|---|---|---|---|")
    flat_wall = None
    for name, threads, bench_qps, cli_qps, wall, search, load in user_sees_what_bench_sees(
            collection, store, args.repeats):
        print(f"| {name} | {threads} | {bench_qps:,.0f} | {cli_qps:,.0f} | {wall:.2f} | "
              f"{search:.2f} | {load:.2f} |")
        flat_wall = wall if name == "flat" else flat_wall
    if flat_wall is not None:
        from sklearn.neighbors import KNeighborsClassifier
        from threadpoolctl import threadpool_limits

        log("scikit-learn predict, 2 threads, for the whole command's ratio")
        train, test = collection.train(), collection.test()
        with threadpool_limits(2):
            model = KNeighborsClassifier(n_neighbors=7).fit(train.pixels.astype(np.float64),
                                                            train.labels)
            _, [predict] = time_batch(lambda: model.predict(test.pixels.astype(np.float64)),
                                      None, 1)
        print(f"\nthe whole `query --index flat` command ({flat_wall:.2f} s: start-up, loading, "
              f"the 14,000 queries) against scikit-learn's predict alone ({predict:.2f} s), "
              f"same run: {predict / flat_wall:.2f}x")


if __name__ == "__main__":
    main()
