"""The order a batch is searched in: queries near each other one after another.

A graph or IVF search of one query touches a region of the index; the next query, if it is
near, finds much of that region still in the CPU's caches. A batch is therefore searched
sorted by its queries' nearest landmark: the HNSW graph's highest-level nodes (a random
sample of the rows, by construction) or the first of the IVF's coarse centroids. Each
query's result is its own whatever the order: only the speed changes (pca-hnsw 1.40x, ivf
1.34x, hnsw 1.25x, deskew-pca-ivf 1.11x on one thread: bench/bench_locality.py).
"""

from __future__ import annotations

import faiss
import numpy as np

from mnist_ann.index.layers import index_layers, transforms_of

LANDMARKS = 64
# smaller batches keep their order: too few queries share a region to gain from it
LOCALITY_BATCH = 256
ORDER_CHUNK = 4096  # queries given their landmark at once


class QueryOrder:
    """Sorts a batch by each query's nearest landmark, after the index's own transforms."""

    def __init__(self, transforms: list[faiss.VectorTransform], landmarks: np.ndarray,
                 owner: faiss.Index) -> None:
        self.owner = owner  # keeps the transforms alive
        self.transforms = transforms
        self.landmarks = faiss.IndexFlatL2(landmarks.shape[1])
        self.landmarks.add(np.ascontiguousarray(landmarks, dtype=np.float32))

    @classmethod
    def of_index(cls, index: faiss.Index) -> QueryOrder | None:
        """The order for an HNSW or IVF index (None for others: a flat scan reads every row
        for every query anyway)."""
        transforms: list[faiss.VectorTransform] = []
        for layer in index_layers(index):
            transforms += transforms_of(layer)
            try:
                if isinstance(layer, faiss.IndexHNSW) and layer.ntotal:
                    levels = faiss.vector_to_array(layer.hnsw.levels)
                    nodes = np.argsort(-levels, kind="stable")[:LANDMARKS]
                    storage = faiss.downcast_index(layer.storage)
                    landmarks = np.stack([storage.reconstruct(int(node)) for node in nodes])
                    return cls(transforms, landmarks, index)
                if isinstance(layer, faiss.IndexIVF) and layer.ntotal:
                    count = min(layer.nlist, LANDMARKS)
                    return cls(transforms, layer.quantizer.reconstruct_n(0, count), index)
            except RuntimeError:  # storage that cannot give vectors back: keep the order
                return None
        return None

    def order(self, features: np.ndarray) -> np.ndarray | None:
        """Positions of the batch in search order, or None to keep it as it is."""
        if len(features) < LOCALITY_BATCH:
            return None
        nearest = np.empty(len(features), np.int64)
        for start in range(0, len(features), ORDER_CHUNK):  # float32 copies of a chunk only
            vectors = np.ascontiguousarray(features[start:start + ORDER_CHUNK], np.float32)
            for transform in self.transforms:
                vectors = transform.apply(vectors)
            nearest[start:start + ORDER_CHUNK] = self.landmarks.search(vectors, 1)[1][:, 0]
        return np.argsort(nearest, kind="stable")
