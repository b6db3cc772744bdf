"""What a FAISS index is made of: its wrapped layers, transforms and stored vectors."""

from __future__ import annotations

import faiss
import numpy as np

from mnist_ann.errors import InvalidArgument


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


def transforms_of(index: faiss.Index) -> list[faiss.VectorTransform]:
    """The vector transforms of a pre-transform index, in order ([] for other indexes)."""
    if not isinstance(index, faiss.IndexPreTransform):
        return []
    return [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())]


def describe_transform(transform: faiss.VectorTransform) -> str:
    if isinstance(transform, faiss.PCAMatrix):
        return f"PCA{transform.d_out}"
    if isinstance(transform, faiss.NormalizationTransform):
        return "L2norm"
    return type(transform).__name__


def drop_pca_rotations(index: faiss.Index) -> None:
    """Free every trained PCA's full d-by-d eigenvector matrix (`PCAMat`, 2.5 MB for 784
    pixels): applying the PCA uses only its d_out-by-d projection, and the matrix would
    otherwise be written with the index."""
    for layer in index_layers(index):
        for transform in transforms_of(layer):
            if isinstance(transform, faiss.PCAMatrix) and transform.is_trained:
                transform.PCAMat.resize(0)


def flat_vectors(index: faiss.Index) -> np.ndarray | None:
    """The float32 vectors [ntotal, d] a flat index (or an HNSW over flat storage) holds, as
    a view into FAISS's memory, valid while the index lives; None for other index types."""
    storage = index.storage if isinstance(index, faiss.IndexHNSW) else index
    storage = faiss.downcast_index(storage)
    if not isinstance(storage, faiss.IndexFlat) or storage.ntotal == 0:
        return None
    return faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * storage.d).reshape(
        storage.ntotal, storage.d)


def stores_bytes(index: faiss.Index) -> bool:
    """True for a scalar quantizer storing each value as its own byte (`SQ8_direct`): exact,
    in a quarter of flat's memory, for whole numbers 0..255 such as pixels."""
    index = faiss.downcast_index(index)
    return (isinstance(index, faiss.IndexScalarQuantizer)
            and index.sq.qtype == faiss.ScalarQuantizer.QT_8bit_direct)


def returns_direct_distances(index: faiss.Index) -> bool:
    """True when the index's distances are sums of squared differences of the vectors it was
    given (IVF,Flat's scanner, HNSW over flat storage, SQ8_direct's scan of bytes): for
    integer vectors they are then exact below 2²⁴, like the re-rank's own. A flat index is
    not: its BLAS path computes |q|² + |x|² - 2 q·x. (SQ8_direct's are the vectors' own only
    for whole numbers 0..255: `direct_distances` in searchers.py checks the space.)"""
    index = faiss.downcast_index(index)
    if index.metric_type != faiss.METRIC_L2:
        return False
    if type(index) is faiss.IndexIVFFlat or stores_bytes(index):
        return True
    return isinstance(index, faiss.IndexHNSW) and type(
        faiss.downcast_index(index.storage)) in (faiss.IndexFlat, faiss.IndexFlatL2)


def is_exhaustive(index: faiss.Index) -> bool:
    """True when every layer is flat, SQ8_direct or a transform: search compares with every
    row."""
    return all(isinstance(layer, faiss.IndexFlat | faiss.IndexPreTransform)
               or stores_bytes(layer) for layer in index_layers(index))


def make_factory_index(dimension: int, factory: str) -> faiss.Index:
    """FAISS's index for a factory string, or InvalidArgument naming what FAISS refused."""
    try:
        return faiss.index_factory(dimension, factory, faiss.METRIC_L2)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "rejected"
        raise InvalidArgument(f"invalid FAISS factory string {factory!r}: {first}") from exc


def describe_factory(factory: str, dimension: int) -> dict:
    """Check a factory string with FAISS and say what kind of index it makes."""
    index = make_factory_index(dimension, factory)
    layers = index_layers(index)
    ivf = next((layer for layer in layers if isinstance(layer, faiss.IndexIVF)), None)
    hnsw = next((layer for layer in layers if isinstance(layer, faiss.IndexHNSW)), None)
    pca = [t.d_out for layer in layers for t in transforms_of(layer)
           if isinstance(t, faiss.PCAMatrix)]
    return {"nlist": ivf.nlist if ivf is not None else None, "hnsw": hnsw is not None,
            "pca": max(pca, default=None)}
