"""Sharded indexes on a Dask cluster (`dask.distributed`, the `distributed` extra).

`--cluster local:W` starts a LocalCluster of W worker processes on 127.0.0.1 (no dashboard);
`--cluster tcp://HOST:PORT` uses a running scheduler, whose workers must see the store at the
same path (a shared file system). Workers fill shards when building, and search them when
querying: each worker keeps the shards it has searched loaded, in a cache keyed by the
shard's sha256, and reads a shard only after its checksum passes. The client merges the
per-shard exact neighbours by (distance, global row), exactly as in one process. Dask runs
a task lost with its worker again on another; a query that cannot be completed fails with
one line, never with part of an answer.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_ann.errors import InvalidArgument, MnistAnnError
from mnist_ann.index.neighbours import Neighbours
from mnist_ann.index.sharded import ShardedSearcher
from mnist_ann.runtime import Log, faiss_threads, silent
from mnist_ann.store.collection import TRAIN_FILE, ShardFile

_SPEC = re.compile(r"^(local:(?P<workers>[1-9][0-9]{0,2})|(?P<address>tcp://[\w.\-]+:\d{1,5}))$")
CACHED_SHARDS = 16  # per worker process
CONNECT_TIMEOUT = "10s"


def check_cluster(spec: str) -> str:
    if not _SPEC.match(spec):
        raise InvalidArgument(f"--cluster {spec!r}: give local:W (W worker processes here) or "
                              "tcp://HOST:PORT (a running Dask scheduler)")
    return spec


@contextlib.contextmanager
def connected(spec: str | None, log: Log = silent) -> Iterator[Cluster | None]:
    """A client of the cluster `spec` for the block (None without one); a local cluster
    started here is shut down after it."""
    if spec is None:
        yield None
        return
    match = _SPEC.match(check_cluster(spec))
    try:
        import logging

        from distributed import Client, LocalCluster
    except ImportError:
        raise MnistAnnError("--cluster needs Dask: pip install 'mnist-ann[distributed]'") from None
    local = None
    try:
        if match["workers"]:
            workers = int(match["workers"])
            log(f"starting a local Dask cluster of {workers} worker processes")
            local = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                 host="127.0.0.1", dashboard_address=None,
                                 silence_logs=logging.ERROR)
            client = Client(local)
        else:
            client = Client(match["address"], timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        if local is not None:
            local.close()
        raise MnistAnnError(f"cannot reach the Dask cluster {spec} ({exc})") from exc
    try:
        yield Cluster(client)
    finally:
        client.close()
        if local is not None:
            local.close()


@dataclass(frozen=True)
class ShardTask:
    """What a worker needs to search one shard: where it is, and what it must be."""

    store: str
    collection: str
    entry: dict
    shard: ShardFile
    train_sha256: str


class Cluster:
    """Shards filled and searched by a Dask client's workers."""

    def __init__(self, client) -> None:
        self.client = client

    def fill_shards(self, template: bytes, vectors: np.ndarray,
                    ranges: list[tuple[int, int]], label: str) -> list[memoryview]:
        """Each shard filled by a worker from the trained template (build's `fill`)."""
        futures = [self.submit(_filled, template, np.ascontiguousarray(vectors[a:b]),
                               f"{label} shard {number}")
                   for number, (a, b) in enumerate(ranges)]
        return [memoryview(data) for data in self._gather(futures, "filling the shards")]

    def searcher(self, collection, name: str) -> ShardedSearcher:
        """Index `name` of `collection`, its shards searched on the workers."""
        if name not in collection.indexes:
            collection.load_index(name)  # an unknown index: its own error
        entry = collection.indexes[name]
        if int(entry.get("shards", 1)) < 2:
            raise MnistAnnError(f"index {name!r} is not sharded: a cluster searches the "
                                "shards of an index built with --shards N")
        shards = collection.shard_files(name)  # the shard list, verified here first
        train_sha = collection.manifest["files"][TRAIN_FILE]["sha256"]
        tasks = [ShardTask(str(collection.root.parent), collection.name, entry, shard,
                           train_sha) for shard in shards]
        remote = [RemoteShard(task, f"{name}[{number}]") for number, task in enumerate(tasks)]

        def search_shards(queries: np.ndarray, k: int, params: Mapping | None):
            queries = np.ascontiguousarray(queries)
            homes = self.homes(len(tasks))
            futures = [self.submit(search_shard, task, queries,
                                    min(k, task.shard.rows[1] - task.shard.rows[0]),
                                    dict(params or {}), workers=homes[number])
                       for number, task in enumerate(tasks)]
            return self._gather(futures, f"searching {name}'s shards")

        return ShardedSearcher(remote, [shard.rows for shard in shards], name,
                               SpaceName.of(entry), search_shards)

    def submit(self, function, *args, workers=None):
        """A task carrying its own arguments. Not scattered: data scattered to a worker is
        lost with it, where a task's own arguments go with the task when Dask runs it again
        elsewhere (and Dask's broadcast scatter was seen to hang here, workers gathering from
        each other without end). Dask's warning about large arguments is expected."""
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="(Large object|Sending large graph)",
                                    category=UserWarning)
            return self.client.submit(function, *args, pure=False, workers=workers,
                                      allow_other_workers=workers is not None)

    def homes(self, count: int) -> list:
        """The worker each of `count` shards is sent to: shard i to the i-th worker, round
        the sorted addresses, so that each worker loads and keeps about 1/W of the shards
        (a task whose worker is gone runs on another)."""
        addresses = sorted(self.client.scheduler_info()["workers"])
        if not addresses:
            return [None] * count
        return [[addresses[number % len(addresses)]] for number in range(count)]

    def _gather(self, futures: list, doing: str) -> list:
        try:
            return self.client.gather(futures)
        except MnistAnnError:
            raise
        except Exception as exc:  # a worker lost for good, or the scheduler gone
            for future in futures:
                future.cancel()
            raise MnistAnnError(f"the cluster failed while {doing} ({type(exc).__name__}: "
                                f"{exc}); nothing was answered: try again, or check the "
                                "cluster's workers") from exc


def _filled(template: bytes, vectors: np.ndarray, label: str) -> bytes:
    """On a worker: one shard filled from the trained template (build.fill_shard)."""
    from mnist_ann.index.build import fill_shard

    with faiss_threads(1):
        return bytes(fill_shard(template, vectors, label))


@dataclass(frozen=True)
class SpaceName:
    """What the client knows of a remote index's ranking space: its key and description."""

    key: str
    description: str

    @classmethod
    def of(cls, entry: dict) -> SpaceName:
        steps = list(entry.get("pipeline") or [])
        if entry.get("rank_space") in ("index", "codes"):
            steps.append(f"{entry['factory']}'s own transforms")
        return cls("-".join(steps) or "pixels", " → ".join(steps) or "pixels")


class RemoteShard:
    """A shard searched on the workers: its parameters are checked there."""

    def __init__(self, task: ShardTask, name: str) -> None:
        self.task, self.name = task, name
        self.defaults = dict(task.entry.get("search_defaults") or {})

    @property
    def ntotal(self) -> int:
        return self.task.shard.rows[1] - self.task.shard.rows[0]

    @property
    def space(self) -> SpaceName:
        return SpaceName.of(self.task.entry)

    def parameters(self, overrides: Mapping | None = None) -> dict:
        return {**self.defaults, **(overrides or {})}

    def with_defaults(self, defaults: Mapping) -> RemoteShard:
        other = RemoteShard(self.task, self.name)
        other.defaults = dict(defaults)
        return other


# --- on the workers ----------------------------------------------------------------------

_CACHE: OrderedDict = OrderedDict()
_CACHE_LOCK = threading.Lock()


def cached_shards() -> list[str]:
    """The sha256s of the shards this worker holds loaded (for `client.run`)."""
    with _CACHE_LOCK:
        return [shard for shard, _ in _CACHE]


def search_shard(task: ShardTask, queries: np.ndarray, k: int, params: dict) -> Neighbours:
    """One shard's exact top k of each query (rows local to the shard), on a worker."""
    searcher = _cached_searcher(task)
    with faiss_threads(1):
        found = searcher.search(queries, k, params)
    return Neighbours(found.rows, found.distances)


def _cached_searcher(task: ShardTask):
    key = (task.shard.sha256, task.train_sha256)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        searcher = _load_shard(task)
        _CACHE[key] = searcher
        while len(_CACHE) > CACHED_SHARDS:
            _CACHE.popitem(last=False)
        return searcher


def _load_shard(task: ShardTask):
    from mnist_ann.index.factory import shard_searcher
    from mnist_ann.index.recipes import Recipe
    from mnist_ann.store.collection import Collection

    collection = Collection.open(Path(task.store), task.collection)
    recorded = collection.manifest["files"]
    if recorded.get(task.shard.file, {}).get("sha256") != task.shard.sha256 or recorded.get(
            TRAIN_FILE, {}).get("sha256") != task.train_sha256:
        raise MnistAnnError(f"{collection.root}: the index or its training table changed "
                            "while it was being searched; run the query again")
    index = collection.read_shard(task.shard)  # its checksum passes before FAISS parses it
    pixels = collection.train_rows(*task.shard.rows).pixels  # the shard's rows only
    recipe = Recipe.from_entry(task.entry)
    return shard_searcher(recipe, index, pixels, task.shard.file)
