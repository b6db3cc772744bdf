"""Named index recipes: a FAISS factory string, its build arguments, search defaults and grid.

Build arguments are kept apart from search arguments, like ann-benchmarks' `args` and
`query_args`: the first shape the index file, the second are chosen per query call.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from mnist_ann.data.mnist import N_PIXELS
from mnist_ann.errors import InvalidArgument

# search parameters that mnist-ann handles itself (params.py has FAISS's own)
CANDIDATES = "candidates"
COMPONENTS = "components"
MIN_POINTS_PER_LIST = 39  # FAISS's k-means warns below this many training points per centroid
EF_SEARCH_GRID = [8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512]
FOCUS_VALUES = 4  # a focused grid keeps this many values of one parameter, 3 of each of two


@dataclass(frozen=True)
class Recipe:
    """A named way to build an index and to search it."""

    name: str
    factory: str
    build_args: dict = field(default_factory=dict)
    search_defaults: dict = field(default_factory=dict)
    search_grid: dict = field(default_factory=dict)
    builtin: bool = True
    # steps applied to the pixels before FAISS sees them (build and query alike)
    pipeline: tuple[str, ...] = ()
    # where the final exact ranking happens: "input" (the pipeline's output, the pixels when
    # there is none) or "index" (after the factory's own transforms such as L2norm and PCA);
    # "codes": in the index's space too, but ranked by the index's own (compressed) distances,
    # with no exact re-rank, so that nothing but the index and the labels is kept in memory
    rank_space: str = "input"
    # certified: the factory is PCA<D>,Flat, searched by lower-bound pruning (certified.py)
    certified: bool = False
    # the part of search_grid a default report sweeps: the settings that show the trade-off
    focus_grid: dict = field(default_factory=dict)
    # a second stage re-ranking the index's candidates by another distance ("idm")
    rerank: str | None = None
    # the training rows split into this many contiguous ranges, one index file each
    # (sharded.py), searched shard by shard and merged exactly
    shards: int = 1

    def spec(self) -> dict:
        """What identifies the built file: two builds with equal specs are interchangeable."""
        spec = {"recipe": self.name, "factory": self.factory, "build_args": self.build_args,
                "pipeline": list(self.pipeline), "rank_space": self.rank_space}
        if self.certified:
            spec["certified"] = True
        if self.rerank:
            spec["rerank"] = self.rerank
        if self.shards > 1:
            spec["shards"] = self.shards
        return spec

    @classmethod
    def from_entry(cls, entry: dict) -> Recipe:
        """The recipe a manifest entry was built from, with its current (maybe tuned)
        search defaults."""
        return cls(entry["recipe"], entry["factory"], dict(entry.get("build_args") or {}),
                   dict(entry.get("search_defaults") or {}),
                   dict(entry.get("search_grid") or {}), entry["recipe"] in BUILTIN,
                   tuple(entry.get("pipeline") or ()), entry.get("rank_space", "input"),
                   bool(entry.get("certified")), focus_of(entry), entry.get("rerank"),
                   int(entry.get("shards", 1)))


def fitted_nlist(n_train: int) -> int:
    """About 4·sqrt(n) lists, rounded to a power of two, with at least 39 points per list."""
    if n_train < MIN_POINTS_PER_LIST:
        raise InvalidArgument(f"too small a training set for IVF: {n_train} rows, at least "
                              f"{MIN_POINTS_PER_LIST} are needed")
    target = 2 ** round(math.log2(4 * math.sqrt(n_train)))
    return max(1, min(target, n_train // MIN_POINTS_PER_LIST))


def nprobe_grid(nlist: int) -> list[int]:
    grid = [1 << i for i in range(nlist.bit_length()) if (1 << i) <= nlist]
    return grid if grid[-1] == nlist else [*grid, nlist]


def grid_points(search_grid: dict) -> list[dict]:
    """Every combination of the grid's values ({} for an index without search parameters)."""
    names = sorted(search_grid)
    return [dict(zip(names, values, strict=True))
            for values in itertools.product(*(search_grid[name] for name in names))]


def focus_of(entry: dict) -> dict:
    """The focused grid of a manifest entry: its own, else its built-in recipe's (entries
    written before focus grids existed), else a few values of each parameter."""
    if entry.get("focus_grid") is not None:
        return dict(entry["focus_grid"])
    grid = entry.get("search_grid") or {}
    make = BUILTIN.get(entry.get("recipe", ""))
    if make is not None:
        try:
            recipe = make(int(entry.get("ntotal", 0)), int(entry.get("dimension", N_PIXELS)))
        except InvalidArgument:
            recipe = None
        if recipe is not None and recipe.search_grid == grid:
            return dict(recipe.focus_grid)
    return focused_grid(grid)


def focused_grid(search_grid: dict) -> dict:
    """A few values of each parameter, spread over its grid (both ends included): the part of
    a sweep that shows the trade-off without measuring every setting."""
    per_name = FOCUS_VALUES if len(search_grid) <= 1 else 3
    focused = {}
    for name, values in search_grid.items():
        if len(values) <= per_name:
            focused[name] = list(values)
            continue
        positions = sorted({round(i * (len(values) - 1) / (per_name - 1))
                            for i in range(per_name)})
        focused[name] = [values[i] for i in positions]
    return focused


def _within(grid: list, wanted: list) -> list:
    """The wanted values that the grid has (in order), else the grid's smallest."""
    return sorted(set(grid) & set(wanted)) or grid[:1]


def flat_recipe(n_train: int, dimension: int) -> Recipe:
    return Recipe("flat", "Flat")


def ivf_recipe(n_train: int, dimension: int) -> Recipe:
    nlist = fitted_nlist(n_train)
    grid = nprobe_grid(nlist)
    return Recipe("ivf", f"IVF{nlist},Flat", {"nlist": nlist},
                  {"nprobe": min(32, nlist)}, {"nprobe": grid},
                  focus_grid={"nprobe": _within(grid, [4, 16, 32, 64])})


def hnsw_recipe(n_train: int, dimension: int) -> Recipe:
    return Recipe("hnsw", "HNSW32", {"M": 32, "efConstruction": 40}, {"efSearch": 64},
                  {"efSearch": EF_SEARCH_GRID}, focus_grid={"efSearch": [16, 32, 64, 128]})


# deskewed digits scaled to unit length and projected on their first 48 principal axes;
# measured on the seed split's test set with exact search: 96.87% raw, 98.39% deskew,
# 98.51% deskew + PCA64, 98.67% deskew + L2norm + PCA48 (L2norm helped at every PCA size)
DESKEW_PCA = "L2norm,PCA48"


# the deskewed digits' gradient direction planes (pipeline.directions) scaled to unit length
# and projected on their first 64 principal axes. Held out one at a time over all 55,999
# other seed training rows (exact search, k=3): 346 errors, against 763 in DESKEW_PCA's
# space; as deskew-idm's candidates, its 50 nearest re-ranked by IDM make 275 errors where
# deskew-pca's 100 made 322 (bench/bench_directions.py)
DIRECTIONS_PCA = "L2norm,PCA64"
DIRECTIONS_PIPELINE = ("deskew", "directions")


def _needs_images(name: str, dimension: int) -> None:
    if dimension != N_PIXELS:
        raise InvalidArgument(f"recipe {name!r} deskews 28x28 images: it needs {N_PIXELS} "
                              f"features, not {dimension}")


def _needs_features(name: str, dimension: int, at_least: int) -> None:
    if dimension < at_least:
        raise InvalidArgument(f"recipe {name!r} projects on {at_least} principal axes: it "
                              f"needs at least {at_least} features, not {dimension}")


def deskew_flat_recipe(n_train: int, dimension: int) -> Recipe:
    _needs_images("deskew-flat", dimension)
    return Recipe("deskew-flat", "Flat", pipeline=("deskew",))


def deskew_pca_hnsw_recipe(n_train: int, dimension: int) -> Recipe:
    _needs_images("deskew-pca-hnsw", dimension)
    return Recipe("deskew-pca-hnsw", f"{DESKEW_PCA},HNSW32", {"M": 32, "efConstruction": 100},
                  {"efSearch": 24}, {"efSearch": EF_SEARCH_GRID}, pipeline=("deskew",),
                  rank_space="index", focus_grid={"efSearch": [16, 32, 64]})


def _pipeline_ivf_recipe(name: str, transforms: str, pipeline: tuple[str, ...],
                         n_train: int, dimension: int) -> Recipe:
    """IVF over a pipeline's features after `transforms`, ranked in that space; nprobe 16."""
    _needs_images(name, dimension)
    nlist = fitted_nlist(n_train)
    grid = nprobe_grid(nlist)
    return Recipe(name, f"{transforms},IVF{nlist},Flat", {"nlist": nlist},
                  {"nprobe": min(16, nlist)}, {"nprobe": grid},
                  pipeline=pipeline, rank_space="index",
                  focus_grid={"nprobe": _within(grid, [4, 16, 64])})


def deskew_pca_ivf_recipe(n_train: int, dimension: int) -> Recipe:
    return _pipeline_ivf_recipe("deskew-pca-ivf", DESKEW_PCA, ("deskew",), n_train, dimension)


def directions_ivf_recipe(n_train: int, dimension: int) -> Recipe:
    """IVF over the deskewed digits' gradient directions (pipeline.directions), ranked in
    their L2norm,PCA64 space. nprobe 16: what `tune --recall 0.99` chooses on the seed
    split's held-out training rows."""
    return _pipeline_ivf_recipe("directions-ivf", DIRECTIONS_PCA, DIRECTIONS_PIPELINE,
                                n_train, dimension)


def deskew_idm_recipe(n_train: int, dimension: int) -> Recipe:
    """directions-ivf's candidates re-ranked by the image distortion model (idm.py): the
    lists searched for candidates, the pool of nearest re-ranked and the gate that answers
    unanimous queries directly are chosen by `tune --budget` on held-out training rows,
    never on a test set."""
    _needs_images("deskew-idm", dimension)
    nlist = fitted_nlist(n_train)
    return Recipe("deskew-idm", f"{DIRECTIONS_PCA},IVF{nlist},Flat", {"nlist": nlist},
                  dict(IDM_DEFAULTS, nprobe=min(IDM_DEFAULTS["nprobe"], nlist)),
                  {"pool": [25, 50, 100, 200], "gate": [5, 7, 10]},
                  pipeline=DIRECTIONS_PIPELINE, rank_space="index",
                  focus_grid={"pool": [IDM_DEFAULTS["pool"]], "gate": [IDM_DEFAULTS["gate"]]},
                  rerank="idm")


def deskew_pca_sq8_recipe(n_train: int, dimension: int) -> Recipe:
    """Small: deskew-pca's space in one byte a component (IVF over SQ8 codes, 48 bytes a
    row and its 8-byte id), ranked by the codes' own distances. The usual lists: 1024
    against 256 cost 0.15 MB of centroids and halve the rows scanned for the same accuracy."""
    _needs_images("deskew-pca-sq8", dimension)
    nlist = fitted_nlist(n_train)
    grid = nprobe_grid(nlist)
    return Recipe("deskew-pca-sq8", f"{DESKEW_PCA},IVF{nlist},SQ8", {"nlist": nlist},
                  {"nprobe": min(16, nlist)}, {"nprobe": grid}, pipeline=("deskew",),
                  rank_space="codes", focus_grid={"nprobe": _within(grid, [8, 16, 32, 64])})


def deskew_pca_pq_recipe(n_train: int, dimension: int) -> Recipe:
    """Smaller: deskew-pca's space in 12 bytes a row (24 sub-quantizers of 4 bits, FAISS's
    fast-scan PQ), every row compared by the codes' own distances; no ids, no lists."""
    _needs_images("deskew-pca-pq", dimension)
    return Recipe("deskew-pca-pq", f"{DESKEW_PCA},PQ24x4fs", pipeline=("deskew",),
                  rank_space="codes")


# what `tune --budget 15` (18,666 held-out rows) chooses on the seed split's training rows
IDM_DEFAULTS = {"nprobe": 64, "pool": 200, "gate": 5, "k": 1}
CANDIDATES_GRID = [16, 24, 32, 48, 64]


def pca_hnsw_recipe(n_train: int, dimension: int) -> Recipe:
    """Two-stage: candidates from HNSW over a PCA64 projection, re-ranked exactly in pixels.

    efConstruction 500 (not 40): in 64 dimensions the better graph costs seconds to build (11 s
    on 2 threads against 5 s at 200) and reaches recall@7 0.999 at a smaller efSearch (64
    instead of 80 with 64 candidates, on held-out training rows).
    """
    _needs_features("pca-hnsw", dimension, 64)
    return Recipe("pca-hnsw", "PCA64,HNSW32", {"M": 32, "efConstruction": 500},
                  {"efSearch": 32, CANDIDATES: 32},
                  {"efSearch": [16, 24, 32, 48, 64, 80, 96], CANDIDATES: CANDIDATES_GRID},
                  focus_grid={"efSearch": [24, 48, 96], CANDIDATES: [32, 64]})


def pca_ivf_recipe(n_train: int, dimension: int) -> Recipe:
    """Two-stage: candidates from IVF over a PCA64 projection, re-ranked exactly in pixels."""
    _needs_features("pca-ivf", dimension, 64)
    nlist = fitted_nlist(n_train)
    # up to nprobe 128 and 96 candidates: what recall 0.999 takes at 99% confidence
    grid = [p for p in nprobe_grid(nlist) if 4 <= p <= 128] or [nlist]
    return Recipe("pca-ivf", f"PCA64,IVF{nlist},Flat", {"nlist": nlist},
                  {"nprobe": min(16, nlist), CANDIDATES: 32},
                  {"nprobe": grid, CANDIDATES: [*CANDIDATES_GRID, 96]},
                  focus_grid={"nprobe": _within(grid, [8, 16, 32]), CANDIDATES: [32, 64]})


EXACT_PCA_DIMENSION = 128
EXACT_PCA_CANDIDATES = 16  # rows verified first; their k-th distance sets the pruning radius


def exact_pca_recipe(n_train: int, dimension: int) -> Recipe:
    """Certified exact: PCA lower bounds prune, exact integer distances verify."""
    axes = min(EXACT_PCA_DIMENSION, dimension)
    grid = [c for c in (32, 48, 64, 96, 128) if c < axes] + [axes]
    return Recipe("exact-pca", f"PCA{axes},Flat", {},
                  {COMPONENTS: axes, CANDIDATES: EXACT_PCA_CANDIDATES},
                  {COMPONENTS: grid}, certified=True,
                  focus_grid={COMPONENTS: _within(grid, [48, 96, axes])})


BUILTIN: dict[str, Callable[[int, int], Recipe]] = {
    "flat": flat_recipe, "ivf": ivf_recipe, "hnsw": hnsw_recipe,
    "exact-pca": exact_pca_recipe, "pca-hnsw": pca_hnsw_recipe, "pca-ivf": pca_ivf_recipe,
    "deskew-flat": deskew_flat_recipe, "deskew-pca-hnsw": deskew_pca_hnsw_recipe,
    "deskew-pca-ivf": deskew_pca_ivf_recipe, "directions-ivf": directions_ivf_recipe,
    "deskew-idm": deskew_idm_recipe,
    "deskew-pca-sq8": deskew_pca_sq8_recipe, "deskew-pca-pq": deskew_pca_pq_recipe}
DEFAULT_RECIPES = ("flat", "ivf", "hnsw")
_CUSTOM = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_-]{0,63})=(?P<factory>.+)$")


def custom_recipe(name: str, factory: str, dimension: int = N_PIXELS) -> Recipe:
    """A recipe from any FAISS factory string, with search defaults fitting its index type."""
    from mnist_ann.index.layers import describe_factory

    kind = describe_factory(factory, dimension)
    defaults: dict = {}
    grid: dict = {}
    if kind["hnsw"]:
        defaults["efSearch"] = 64
        grid["efSearch"] = EF_SEARCH_GRID
    if kind["nlist"]:
        defaults["nprobe"] = min(32, kind["nlist"])
        grid["nprobe"] = nprobe_grid(kind["nlist"])
    return Recipe(name, factory, {}, defaults, grid, builtin=False)


def resolve_recipe(text: str, n_train: int, dimension: int = N_PIXELS) -> Recipe:
    """A built-in recipe's name, or `NAME=FACTORY`, as a recipe for n training rows."""
    if text in BUILTIN:
        return BUILTIN[text](n_train, dimension)
    match = _CUSTOM.match(text)
    if match is None and "=" in text:
        raise InvalidArgument(f"index name {text.split('=')[0]!r} must be letters, digits, '_' "
                              "or '-' (up to 64, starting with a letter or digit)")
    if match is None:
        raise InvalidArgument(f"unknown recipe {text!r}; known recipes: {', '.join(BUILTIN)}, "
                              "or NAME=FACTORY with any FAISS factory string "
                              "(e.g. fast=PCA64,HNSW32,RFlat)")
    if match["name"] in BUILTIN:
        raise InvalidArgument(f"{match['name']!r} is a built-in recipe; give the custom index "
                              "another name")
    return custom_recipe(match["name"], match["factory"], dimension)


def with_shards(recipe: Recipe, shards: int) -> Recipe:
    """`recipe` built as `shards` indexes over contiguous ranges of the training rows."""
    if shards == 1:
        return recipe
    if recipe.certified or recipe.rerank:
        raise InvalidArgument(f"{recipe.name}: a certified or re-ranked index is not sharded "
                              "(yet); shard flat, IVF, HNSW or PCA recipes")
    return dataclasses.replace(recipe, shards=shards)


def check_trainable(recipe: Recipe, n_train: int, dimension: int = N_PIXELS) -> None:
    """Refuse IVF layouts that k-means cannot train on n rows, and PCAs wider than n."""
    from mnist_ann.index.layers import describe_factory

    kind = describe_factory(recipe.factory, dimension)
    if kind["pca"] is not None and kind["pca"] > n_train:
        raise InvalidArgument(f"{recipe.name}: a PCA to {kind['pca']} dimensions needs at least "
                              f"{kind['pca']} training rows, not {n_train}")
    if kind["pca"] is not None and kind["pca"] > dimension:
        raise InvalidArgument(f"{recipe.name}: a PCA to {kind['pca']} dimensions needs at least "
                              f"{kind['pca']} features, not {dimension}")
    nlist = kind["nlist"]
    if nlist is not None and nlist > n_train:
        raise InvalidArgument(f"{recipe.name}: nlist {nlist} is larger than the training set "
                              f"({n_train} rows); use at most {n_train // MIN_POINTS_PER_LIST}")
