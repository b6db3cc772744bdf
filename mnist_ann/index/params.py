"""Search parameters: which ones an index takes, their checks, and FAISS's per-call objects.

Parameters are passed to FAISS per call, never set on the index, so that one loaded index can
be searched with different settings from several threads at once.
"""

from __future__ import annotations

from collections.abc import Mapping

import faiss

from mnist_ann.errors import InvalidArgument
from mnist_ann.index.layers import index_layers, is_exhaustive
from mnist_ann.index.recipes import CANDIDATES

# beyond these FAISS allocates per query in proportion (efSearch's heap, nprobe's lists)
MAX_EF_SEARCH = 1 << 16


def _layer_parameters(layer: faiss.Index) -> dict[str, type]:
    if isinstance(layer, faiss.IndexHNSW):
        return {"efSearch": int}
    if isinstance(layer, faiss.IndexIVF):
        return {"nprobe": int}
    if isinstance(layer, faiss.IndexRefine):
        return {"k_factor": float}
    return {}


def search_parameter_names(index: faiss.Index) -> dict[str, type]:
    """The per-call search parameters an index takes, with their types.

    Every approximate index takes `candidates`: how many results FAISS returns for the exact
    re-rank (k+8 when not given).
    """
    names: dict[str, type] = {} if is_exhaustive(index) else {CANDIDATES: int}
    for layer in index_layers(index):
        names.update(_layer_parameters(layer))
    return names


def parameter_limits(index: faiss.Index, ntotal: int) -> dict[str, tuple[float, str]]:
    """The largest value each parameter may take on this index, with the reason."""
    limits: dict[str, tuple[float, str]] = {CANDIDATES: (ntotal, "the training size"),
                                            "efSearch": (MAX_EF_SEARCH, "a sane search width"),
                                            "k_factor": (ntotal, "the training size")}
    ivf = next((layer for layer in index_layers(index) if isinstance(layer, faiss.IndexIVF)),
               None)
    if ivf is not None:
        limits["nprobe"] = (ivf.nlist, "the number of lists")
    return limits


def check_search_parameters(index: faiss.Index, params: Mapping, label: str,
                            extra: Mapping[str, tuple[type, float, str]] | None = None,
                            ntotal: int | None = None) -> dict:
    """Validate names and values against the index type; return them with their types.

    `extra` names parameters the caller handles itself, with their type and upper limit.
    """
    known = {**search_parameter_names(index),
             **{name: kind for name, (kind, _, _) in (extra or {}).items()}}
    limits = {**parameter_limits(index, index.ntotal if ntotal is None else ntotal),
              **{name: (top, why) for name, (_, top, why) in (extra or {}).items()}}
    checked = {}
    for name, value in params.items():
        if name not in known:
            takes = ", ".join(sorted(known)) or "no search parameters"
            raise InvalidArgument(f"{label} does not take search parameter {name!r}; it takes "
                                  f"{takes}")
        checked[name] = check_parameter(name, value, known[name],
                                        *limits.get(name, (float("inf"), "")))
    return checked


def check_parameter(name: str, value: object, kind: type, top: float = float("inf"),
                    why: str = "") -> int | float:
    """One search parameter's value: a number (whole for `kind` int) from 1 to `top`."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidArgument(f"search parameter {name}={value!r} is not a number") from exc
    whole = "a whole number " if kind is int else "a number "
    if not (1 <= number <= top) or (kind is int and not number.is_integer()):
        most = f" and at most {top:g} ({why})" if top != float("inf") else ""
        raise InvalidArgument(f"search parameter {name}={value!r} must be {whole}of at "
                              f"least 1{most}")
    return kind(number)


def make_search_parameters(index: faiss.Index, params: Mapping) -> faiss.SearchParameters | None:
    """Per-call FAISS search parameters for `index`, nested through its wrapping layers."""
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
