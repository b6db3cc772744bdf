"""Choose an index's search setting for a target, on a held-out part of the training set.

The test set is never read. The held-out queries are training rows; each is searched for k+1
neighbours and its own row is dropped (leave-one-out), against exact leave-one-out search in
the index's ranking space.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

from mnist_ann.api import Collection
from mnist_ann.classify import Classifier
from mnist_ann.errors import InvalidArgument, MnistAnnError
from mnist_ann.evaluation.metrics import accuracy, recall
from mnist_ann.evaluation.sweep import format_params
from mnist_ann.evaluation.timing import time_batch
from mnist_ann.index.neighbours import Neighbours
from mnist_ann.index.recipes import grid_points
from mnist_ann.runtime import Log, Progress, faiss_threads, no_progress, silent

WARM_UP = 100


@dataclass(frozen=True)
class Target:
    """recall: recall@k at least `value`; accuracy: within `value` of exact search's."""

    kind: str
    value: float

    def describe(self) -> str:
        if self.kind == "recall":
            return f"recall@k ≥ {self.value:g}"
        return f"accuracy ≥ exact - {self.value:g}"

    def met(self, row: dict) -> bool:
        if self.kind == "recall":
            return row["recall"] >= self.value
        return row["accuracy"] >= row["exact_accuracy"] - self.value - 1e-12


def held_out_rows(n_train: int, size: int, seed: int) -> np.ndarray:
    """A seeded random sample of training rows, sorted."""
    if not 1 <= size < n_train:
        raise InvalidArgument(f"held-out size must be between 1 and {n_train - 1}, not {size}")
    return np.sort(np.random.default_rng(seed).choice(n_train, size, replace=False))


def drop_self(neighbours: Neighbours, own_rows: np.ndarray, k: int) -> Neighbours:
    """The k neighbours of each query other than its own training row (leave-one-out)."""
    matches = neighbours.rows == own_rows[:, None]
    # where the query's own row was not found, drop the last neighbour instead
    position = np.where(matches.any(axis=1), matches.argmax(axis=1), k)
    n = len(own_rows)
    keep = np.ones(matches.shape, dtype=bool)
    keep[np.arange(n), position] = False
    return Neighbours(neighbours.rows[keep].reshape(n, k),
                      neighbours.distances[keep].reshape(n, k))


def tune_index(collection: Collection, name: str, target: Target, k: int = 7,
               held_out: int = 2000, seed: int = 0, threads: int = 1, repeats: int = 3,
               log: Log = silent, progress: Progress = no_progress) -> dict:
    """Measure every setting of the index's grid on held-out training rows, record the fastest
    that meets `target` as the index's search default, and return what was measured."""
    if target.kind not in ("recall", "accuracy") or not 0 <= target.value <= 1:
        raise InvalidArgument(f"a target is recall in (0, 1] or an accuracy tolerance in "
                              f"[0, 1], not {target.kind} {target.value}")
    if collection.indexes.get(name, {}).get("rerank"):
        raise InvalidArgument(f"{name}: tune cannot measure a re-ranked index yet (its ground "
                              "truth is exact IDM); bench/choose_idm.py chose its settings on "
                              "held-out training rows")
    searcher = collection.searcher(name)
    grid = collection.indexes[name].get("search_grid", {})
    if not grid:
        raise MnistAnnError(f"index {name!r} has no search parameters to tune")
    train = collection.train()
    own_rows = held_out_rows(len(train), held_out, seed)
    queries, labels = train.pixels[own_rows], train.labels[own_rows]
    exact_searcher = collection.exact_searcher(name)
    log(f"{name}: exact leave-one-out neighbours of {held_out:,} held-out training rows in the "
        f"{searcher.space.description} space")
    with faiss_threads(threads):
        truth = drop_self(exact_searcher.search(queries, k + 1), own_rows, k)
    voter = Classifier(searcher, train.labels, k=k)
    exact_accuracy = accuracy(voter.votes(truth), labels)
    measured = []
    points = grid_points(grid)
    with progress(f"tuning {name}", len(points)) as bar, faiss_threads(threads):
        for params in points:
            found, seconds = time_batch(lambda p=params: searcher.search(queries, k + 1, p),
                                        lambda p=params: searcher.search(queries[:WARM_UP],
                                                                         k + 1, p), repeats)
            found = drop_self(found, own_rows, k)
            row = {"params": searcher.parameters(params),
                   "recall": recall(found.distances, truth.distances, k),
                   "accuracy": accuracy(voter.votes(found), labels),
                   "exact_accuracy": exact_accuracy,
                   "queries_per_second": held_out / statistics.median(seconds)}
            row["meets_target"] = target.met(row)
            measured.append(row)
            bar.update(1)
    meeting = [row for row in measured if row["meets_target"]]
    if not meeting:
        best = max(measured, key=lambda r: (r["recall"], r["accuracy"]))
        raise MnistAnnError(f"no setting of index {name!r} reaches {target.describe()} on the "
                            f"held-out rows (best: {format_params(best['params'])} with recall "
                            f"{best['recall']:.4f}, accuracy {best['accuracy']:.4f}); the "
                            "manifest is unchanged")
    chosen = max(meeting, key=lambda r: r["queries_per_second"])
    tuned_sha = collection.indexes[name]["sha256"]
    with collection.writing(log) as change:
        entry = change.manifest["indexes"].get(name)
        if entry is None or entry["sha256"] != tuned_sha:
            raise MnistAnnError(f"index {name!r} was rebuilt or dropped by another command "
                                "while it was being tuned; the manifest is unchanged: run "
                                "tune again")
        entry.setdefault("recipe_search_defaults", dict(entry["search_defaults"]))
        entry["search_defaults"] = chosen["params"]
        entry["tuned"] = {
            "target": {"kind": target.kind, "value": target.value}, "k": k,
            "held_out": {"rows": held_out, "seed": seed, "from": "train"},
            "threads": threads, "repeats": repeats, "params": chosen["params"],
            "recall": chosen["recall"], "accuracy": chosen["accuracy"],
            "exact_accuracy": exact_accuracy, "queries_per_second": chosen["queries_per_second"],
            "tuned": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    collection.defaults_changed(name)
    log(f"{name}: {format_params(chosen['params'])} is the fastest setting meeting "
        f"{target.describe()}; recorded as its search default")
    return {"index": name, "target": target.describe(), "chosen": chosen,
            "measured": measured, "exact_accuracy": exact_accuracy}
