"""One self-contained model file: everything a device needs to classify, without a store.

    mnist-ann export --collection seed --index deskew-pca-pq --out digits.model
    mnist-ann query --model digits.model --input my-digits/

Layout: a magic line, the header's length (8 bytes, little-endian), the header (JSON: the
index's manifest entry with its pipeline and search defaults, k, the rows and where they
came from, the sections' sizes), the sections (the FAISS index file as stored, one byte a
label, and the training pixels when the ranking reads them), then the sha256 of everything
before it. The checksum is checked before anything is parsed, and every size against the
file's real size before anything is allocated.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_ann.classify import Classifier
from mnist_ann.data.mnist import N_PIXELS
from mnist_ann.data.tables import Table
from mnist_ann.errors import DataError, InvalidArgument, MnistAnnError
from mnist_ann.fileio import write_bytes

MAGIC = b"mnist-ann model\n"
FORMAT = 1
LENGTH = struct.Struct("<Q")
DIGEST = 32
MAX_HEADER = 1 << 20
SECTIONS = ("index", "labels", "pixels")


@dataclass(frozen=True)
class Model:
    """A model file's header and sections, checked."""

    header: dict
    index: memoryview
    labels: np.ndarray
    pixels: np.ndarray | None

    @property
    def name(self) -> str:
        return self.header["name"]

    @property
    def entry(self) -> dict:
        return self.header["entry"]

    def classifier(self, *, k: int | None = None, params: dict | None = None,
                   weights: str = "uniform", threads: int | None = None) -> Classifier:
        """A classifier over the model alone (k the model's, unless given). Neighbour ids
        are rows of the model's training set: the model keeps no MNIST ids."""
        import faiss

        from mnist_ann.index.factory import make_reranked, make_searcher
        from mnist_ann.index.recipes import Recipe
        from mnist_ann.index.searchers import space_transforms
        from mnist_ann.index.space import featureless_space, image_space

        recipe = Recipe.from_entry(self.entry)
        try:
            index = faiss.deserialize_index(np.frombuffer(self.index, dtype=np.uint8))
        except RuntimeError as exc:  # after the checksum: written by another FAISS
            raise MnistAnnError(f"model {self.name!r}: its index cannot be read by this "
                                f"FAISS ({str(exc).strip().splitlines()[-1]})") from exc
        rows = len(self.labels)
        if index.ntotal != rows:
            raise DataError(f"model {self.name!r}: its index holds {index.ntotal:,} rows, its "
                            f"labels {rows:,}")
        transforms = space_transforms(recipe, index)
        key = f"model-{self.entry['sha256'][:12]}"
        if self.pixels is None:
            space = featureless_space(key, recipe.pipeline, transforms, rows, owner=index)
        else:
            space = image_space(key, recipe.pipeline, transforms, self.pixels, owner=index)
        searcher = make_searcher(recipe, index, space, self.name)
        if recipe.rerank:
            searcher = make_reranked(recipe, searcher,
                                     Table(np.arange(rows), self.labels, self.pixels),
                                     self.name)
        if k is None:
            k = int(getattr(searcher, "default_k", None) or self.header["k"])
        return Classifier(searcher, self.labels, k=k, params=params, weights=weights,
                          threads=threads)


def export_model(collection, name: str, out: Path) -> dict:
    """Write index `name` of `collection` (an api.Collection) as one model file at `out`;
    return its header."""
    from mnist_ann.store.collection import TRAIN_FILE

    entry = collection.indexes.get(name)
    collection.searcher(name)  # an unknown or damaged index: its own error
    if int(entry.get("shards", 1)) > 1:
        raise InvalidArgument(f"{name}: a sharded index is not exported; export an unsharded "
                              "build of its recipe")
    index_bytes = collection.read_verified(entry["file"])
    train = collection.train()
    if train.labels is None:
        raise MnistAnnError(f"{collection.name}: the training table has no labels")
    sections = {"index": index_bytes,
                "labels": np.ascontiguousarray(train.labels, dtype=np.uint8).tobytes()}
    if entry.get("rank_space") != "codes" or entry.get("rerank"):
        sections["pixels"] = np.ascontiguousarray(train.pixels, dtype=np.uint8).tobytes()
    searcher = collection.searcher(name)
    header = {"format": FORMAT, "name": name, "entry": entry,
              "k": int(getattr(searcher, "default_k", None) or 7),
              "rows": len(train), "collection": collection.name,
              "split": collection.manifest["split"],
              "train_sha256": collection.manifest["files"][TRAIN_FILE]["sha256"],
              "sections": [{"name": key, "bytes": len(data)} for key, data in sections.items()]}
    header_bytes = json.dumps(header, sort_keys=True).encode()
    body = b"".join([MAGIC, LENGTH.pack(len(header_bytes)), header_bytes, *sections.values()])
    write_bytes(out, body + hashlib.sha256(body).digest())
    return header


def read_model(path: str | Path, max_bytes: int | None = None) -> Model:
    """A model file, checked: its size (at most `max_bytes`), its sha256, then its header
    and every section's size, before any of it is parsed."""
    path = Path(path)
    what = f"model {path}"
    try:
        size = path.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise DataError(f"{what}: {size:,} bytes, more than the {max_bytes:,} allowed")
        if size < len(MAGIC) + LENGTH.size + DIGEST:
            raise DataError(f"{what}: too short to be an mnist-ann model ({size:,} bytes)")
        with open(path, "rb") as handle:
            if handle.read(len(MAGIC)) != MAGIC:
                raise DataError(f"{what}: not an mnist-ann model file (export one with "
                                "`mnist-ann export`)")
            data = memoryview(MAGIC + handle.read())  # sliced below without copies
    except OSError as exc:
        raise DataError(f"{what}: cannot be read ({exc.strerror or exc})") from exc
    body, digest = data[:-DIGEST], data[-DIGEST:]
    if hashlib.sha256(body).digest() != bytes(digest):
        raise DataError(f"{what}: fails its checksum (damaged or changed since it was "
                        "exported)")
    (length,) = LENGTH.unpack_from(body, len(MAGIC))
    start = len(MAGIC) + LENGTH.size
    if length > min(MAX_HEADER, len(body) - start):
        raise DataError(f"{what}: its header claims {length:,} bytes")
    try:
        header = json.loads(bytes(body[start:start + length]))
        sections = [(str(item["name"]), int(item["bytes"])) for item in header["sections"]]
        rows = int(header["rows"])
        if header["format"] != FORMAT:
            raise DataError(f"{what}: format {header['format']!r}; this mnist-ann reads "
                            f"format {FORMAT}")
        _ = (header["entry"]["sha256"], str(header["name"]), int(header["k"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{what}: its header is not a model's ({exc})") from exc
    names = [name for name, _ in sections]
    expected = {"index": None, "labels": rows, "pixels": rows * N_PIXELS}
    if (len(set(names)) != len(names) or not set(names) <= set(SECTIONS)
            or not {"index", "labels"} <= set(names)
            or any(expected[name] not in (None, count) for name, count in sections)
            or min(count for _, count in sections) < 0
            or sum(count for _, count in sections) != len(body) - start - length):
        raise DataError(f"{what}: its sections {sections} do not fit its {rows:,} rows and "
                        f"{size:,} bytes")
    parts, offset = {}, start + length
    for name, count in sections:
        parts[name] = body[offset:offset + count]
        offset += count
    labels = np.frombuffer(parts["labels"], dtype=np.uint8)
    pixels = (np.frombuffer(parts["pixels"], dtype=np.uint8).reshape(rows, N_PIXELS)
              if "pixels" in parts else None)
    return Model(header, parts["index"], labels, pixels)
