"""The library's front door: a store of collections whose indexes are ready to classify.

    from mnist_ann import Store
    seed = Store()["seed"]                  # ./indexes or $MNIST_ANN_STORE; Store(path) too
    clf = seed.classifier("hnsw", k=7, params={"efSearch": 64}, threads=2)
    clf.predict(X); clf.predict_proba(X); clf.kneighbors(X); clf.score(X, y)

The CLI, the report and the server use these same objects. A collection loads each index
once, verified, and shares one ranking space (the training features) between all the
indexes that rank in it; its searchers and classifiers may be used from many threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mnist_ann.classify import Classifier
from mnist_ann.cluster import Cluster
from mnist_ann.errors import MnistAnnError
from mnist_ann.index.factory import make_reranked, make_searcher, shard_searcher
from mnist_ann.index.recipes import Recipe
from mnist_ann.index.searchers import Searcher, exhaustive_searcher, space_transforms
from mnist_ann.index.sharded import ShardedSearcher
from mnist_ann.index.space import RankingSpace, image_space
from mnist_ann.store import collection as stored
from mnist_ann.store.collection import list_collections, resolve_store


class UnknownCollection(MnistAnnError, KeyError):
    """No collection of that name in the store."""

    def __str__(self) -> str:
        return str(self.args[0])


class Collection(stored.Collection):
    """A collection (tables, indexes, manifest) whose indexes can be searched and classified
    with."""

    def __init__(self, root: Path, manifest: dict) -> None:
        super().__init__(root, manifest)
        self._spaces: dict[str, RankingSpace] = {}
        self._searchers: dict[str, Searcher] = {}
        self._exact: dict[str, Searcher] = {}
        self._assembly = threading.RLock()
        self.load_seconds: dict[str, float] = {}

    def searcher(self, name: str) -> Searcher:
        """Index `name`, loaded and verified once, ready to search (shared by callers)."""
        with self._assembly:
            if name not in self._searchers:
                started = time.perf_counter()
                # the training table is read while the index is hashed and parsed
                with ThreadPoolExecutor(1) as pool:
                    train = pool.submit(self.train)
                    index = self.load_index(name)
                    train.result()
                recipe = Recipe.from_entry(index.entry)
                if index.shards:
                    self._searchers[name] = self._sharded(index, recipe)
                else:
                    space = self.space(index.space_key, recipe, index.index)
                    self._searchers[name] = make_reranked(
                        recipe, make_searcher(recipe, index.index, space, name), self.train(),
                        name)
                self.load_seconds[name] = time.perf_counter() - started
            return self._searchers[name]

    def _sharded(self, index: stored.StoredIndex, recipe: Recipe) -> ShardedSearcher:
        pixels = self.train().pixels
        ranges = [shard.rows for shard in index.shards]
        shards = [shard_searcher(recipe, shard_index, pixels[start:stop],
                                 f"{index.name}[{number}]")
                  for number, (shard_index, (start, stop))
                  in enumerate(zip(index.index, ranges, strict=True))]
        space = self.space(index.space_key, recipe, index.index[0])  # over every row
        return ShardedSearcher(shards, ranges, index.name, space)

    def defaults_changed(self, name: str) -> None:
        """Index `name`'s search defaults were changed in the manifest (by tune): searches
        made from now on use them."""
        with self._assembly:
            if name in self._searchers:
                self._searchers[name] = self._searchers[name].with_defaults(
                    self.indexes[name]["search_defaults"])

    def space(self, key: str, recipe: Recipe, index: object) -> RankingSpace:
        """The ranking space `key`, made from the first index that ranks in it."""
        with self._assembly:
            if key not in self._spaces:
                self._spaces[key] = image_space(key, recipe.pipeline,
                                                space_transforms(recipe, index),
                                                self.train().pixels, owner=index)
            return self._spaces[key]

    def exact_searcher(self, name: str) -> Searcher:
        """Exact search in the ranking space of index `name`: the flat index for pixels,
        brute force over the space's features otherwise (the ground truth of recall)."""
        searcher = self.searcher(name)
        key = searcher.space.key
        with self._assembly:
            if key not in self._exact:
                if key == "pixels" and "flat" in self.indexes:
                    self._exact[key] = self.searcher("flat")
                else:
                    self._exact[key] = exhaustive_searcher(searcher.space, f"exact {key}")
            return self._exact[key]

    def classifier(self, name: str, *, k: int | None = None, params: Mapping | None = None,
                   weights: str = "uniform", threads: int | None = None,
                   cluster: Cluster | None = None) -> Classifier:
        """A k-NN classifier over index `name` (its search defaults, unless `params` say
        otherwise; k the index's own when it was chosen with it, else the study's 7). With
        `cluster` (cluster.connected), a sharded index's shards are searched there."""
        train = self.train()
        if train.labels is None:
            raise MnistAnnError(f"{self.name}: the training table has no labels")
        searcher = self.searcher(name) if cluster is None else cluster.searcher(self, name)
        if k is None:
            k = int(getattr(searcher, "default_k", None) or 7)
        return Classifier(searcher, train.labels, ids=train.ids, k=k, params=params,
                          weights=weights, threads=threads)


class Store:
    """A folder of collections: `Store()` is ./indexes or $MNIST_ANN_STORE."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = resolve_store(path)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    def __getitem__(self, name: str) -> Collection:
        if not (self.path / name / stored.MANIFEST).is_file():
            stored.validate_name(name)
            known = ", ".join(self) or "none yet"
            raise UnknownCollection(f"no collection {name!r} in store {self.path} (known: "
                                    f"{known}); create it with `mnist-ann build`")
        return Collection.open(self.path, name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (self.path / name / stored.MANIFEST).is_file()

    def __iter__(self) -> Iterator[str]:
        return iter(collection.name for collection in list_collections(self.path))

    def __len__(self) -> int:
        return sum(1 for _ in self)
