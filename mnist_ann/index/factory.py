"""Which searcher a recipe's index is searched with: a registry of kinds by name.

A new kind of searcher (sharded, re-ranked by another distance) is a new class behind the
`Searcher` protocol, registered here under its name; the others stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

from mnist_ann.data.tables import Table
from mnist_ann.errors import InvalidArgument
from mnist_ann.index.certified import CertifiedSearcher
from mnist_ann.index.layers import is_exhaustive, stores_bytes
from mnist_ann.index.recipes import Recipe
from mnist_ann.index.searchers import (
    CodesSearcher,
    ExhaustiveSearcher,
    RerankSearcher,
    Searcher,
    searched_index,
    space_transforms,
)
from mnist_ann.index.space import RankingSpace, image_space

SearcherKind = Callable[[Recipe, faiss.Index, RankingSpace, str], Searcher]


def faiss_searcher(recipe: Recipe, index: faiss.Index, space: RankingSpace,
                   name: str) -> Searcher:
    """A flat index (or SQ8_direct over bytes) is searched exhaustively and certified; any
    other re-ranks candidates."""
    searched = searched_index(recipe, index)
    exhaustive = is_exhaustive(searched) and (not stores_bytes(searched)
                                              or space.dtype == np.uint8)
    kind = ExhaustiveSearcher if exhaustive else RerankSearcher
    return kind(searched, space, recipe.search_defaults, name, owner=index)


def certified_searcher(recipe: Recipe, index: faiss.Index, space: RankingSpace,
                       name: str) -> Searcher:
    return CertifiedSearcher(index, space, recipe.search_defaults, name)


def codes_searcher(recipe: Recipe, index: faiss.Index, space: RankingSpace,
                   name: str) -> Searcher:
    return CodesSearcher(searched_index(recipe, index), space, recipe.search_defaults, name,
                         owner=index)


SEARCHER_KINDS: dict[str, SearcherKind] = {"faiss": faiss_searcher,
                                           "certified": certified_searcher,
                                           "codes": codes_searcher}


def kind_of(recipe: Recipe) -> str:
    if recipe.certified:
        return "certified"
    return "codes" if recipe.rank_space == "codes" else "faiss"


def make_searcher(recipe: Recipe, index: faiss.Index, space: RankingSpace,
                  name: str | None = None) -> Searcher:
    """The searcher a recipe's index is searched with, over `space`."""
    return SEARCHER_KINDS[kind_of(recipe)](recipe, index, space, name or recipe.name)


def idm_reranker(base: Searcher, train: Table, recipe: Recipe, name: str) -> Searcher:
    from mnist_ann.index.idm import IdmSearcher

    if train.labels is None:
        raise InvalidArgument(f"{name}: the IDM gate needs a labelled training table")
    return IdmSearcher(base, train.pixels, train.labels, recipe.search_defaults, name)


# second stages: re-rank a searcher's candidates by another distance
RERANKERS: dict[str, Callable[[Searcher, Table, Recipe, str], Searcher]] = {"idm": idm_reranker}


def make_reranked(recipe: Recipe, base: Searcher, train: Table, name: str) -> Searcher:
    """`base` as it is, or wrapped in the recipe's second stage."""
    if not recipe.rerank:
        return base
    if recipe.rerank not in RERANKERS:
        raise InvalidArgument(f"{name}: unknown re-rank stage {recipe.rerank!r}; known: "
                              f"{', '.join(RERANKERS)}")
    return RERANKERS[recipe.rerank](base, train, recipe, name)


def shard_searcher(recipe: Recipe, index: faiss.Index, shard_pixels, name: str) -> Searcher:
    """The searcher of one shard, ranking exactly over the shard's own training rows."""
    space = image_space(f"{name}-rows", recipe.pipeline, space_transforms(recipe, index),
                        shard_pixels, owner=index)
    return make_searcher(recipe, index, space, name)
