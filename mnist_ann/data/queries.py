"""Query inputs (tables, .npy, IDX, PNG folders) and prediction outputs (Parquet, CSV)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_ann.data.mnist import (
    IDX_IMAGE_MAGIC,
    IDX_LABEL_MAGIC,
    MAX_IMAGES,
    N_PIXELS,
    as_pixels,
    read_idx_file,
)
from mnist_ann.data.tables import Table, read_parquet
from mnist_ann.errors import DataError, InvalidArgument
from mnist_ann.fileio import atomic_path

OUTPUT_SUFFIXES = (".parquet", ".csv")


@dataclass(frozen=True)
class Queries:
    """Images to classify: names (MNIST ids or file names), labels if known, uint8 pixels."""

    names: np.ndarray
    labels: np.ndarray | None
    pixels: np.ndarray
    description: str

    @classmethod
    def from_table(cls, table: Table, description: str) -> Queries:
        return cls(table.ids, table.labels, table.pixels, description)


def read_images(paths: list[Path], normalize_mode: str = "auto",
                records: list | None = None) -> Queries:
    """Image files (PNG, JPEG, WEBP), or folders of them, made MNIST-style by `normalize`
    (`auto`: a 28x28 grey white-on-black image passes unchanged); named by file name. With
    `records`, what normalisation did to each is appended there."""
    from mnist_ann.data.normalize import image_files, normalize

    files = image_files(paths)
    if len(files) > MAX_IMAGES:
        raise DataError(f"{len(files):,} images, more than the {MAX_IMAGES:,} mnist-ann reads "
                        "at once; split the folder")
    images = []
    for path in files:
        result = normalize(path, normalize_mode, str(path))
        images.append(result.pixels.reshape(N_PIXELS))
        if records is not None:
            records.append({"file": path.name, **result.record})
    return Queries(np.array([p.name for p in files]), None, np.stack(images),
                   ", ".join(map(str, paths)))


def read_npy(path: Path) -> np.ndarray:
    """An .npy array of images, its header checked against the file before any allocation:
    the shape must be images, the dtype numbers, and the data as long as the header says."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = header(handle)
            offset = handle.tell()
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npy array ({exc})") from exc
    if dtype.hasobject or dtype.kind not in "biuf":
        raise DataError(f"{path}: the array holds {dtype}, not numbers; expected whole numbers "
                        "0..255")
    if not ((len(shape) == 2 and shape[1:] == (N_PIXELS,))
            or (len(shape) == 3 and shape[1:] == (28, 28))):
        raise DataError(f"{path}: images have shape {list(shape)}; expected [n, {N_PIXELS}] "
                        "or [n, 28, 28]")
    if shape[0] > MAX_IMAGES:
        raise DataError(f"{path}: {shape[0]:,} images, more than the {MAX_IMAGES:,} mnist-ann "
                        "reads at once; split the file")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = path.stat().st_size - offset
    if actual != expected:
        raise DataError(f"{path}: its header promises {expected:,} bytes of data, the file "
                        f"holds {actual:,}; it is truncated or not what it claims")
    array = np.fromfile(path, dtype=dtype, count=int(np.prod(shape)), offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


def read_queries(source: Path, labels_path: Path | None = None,
                 normalize_mode: str = "auto") -> Queries:
    """Queries from a Parquet table, .npy array, IDX image file, or image files (a file or a
    folder of PNG, JPEG or WEBP, normalised MNIST-style)."""
    from mnist_ann.data.normalize import IMAGE_SUFFIXES

    if labels_path is not None and (source.is_dir() or source.suffix in (".parquet", ".npy")):
        raise InvalidArgument("--labels goes with an IDX image file")
    if source.is_dir() or source.suffix.lower() in IMAGE_SUFFIXES:
        return read_images([source], normalize_mode)
    if not source.is_file():
        raise DataError(f"{source}: no such file or folder")
    if source.suffix == ".parquet":
        return Queries.from_table(read_parquet(source, MAX_IMAGES), str(source))
    if source.suffix == ".npy":
        pixels = as_pixels(read_npy(source), str(source))
        return Queries(np.arange(len(pixels)), None, pixels, str(source))
    pixels = as_pixels(read_idx_file(source, IDX_IMAGE_MAGIC), str(source))
    labels = None
    if labels_path is not None:
        labels = read_idx_file(labels_path, IDX_LABEL_MAGIC)
        if len(labels) != len(pixels):
            raise DataError(f"{labels_path}: {len(labels)} labels for {len(pixels)} images")
    return Queries(np.arange(len(pixels)), labels, pixels, str(source))


def check_output_path(path: Path) -> None:
    if path.suffix not in OUTPUT_SUFFIXES:
        raise InvalidArgument(f"output {path} must end in {' or '.join(OUTPUT_SUFFIXES)}")
    if not path.parent.is_dir():
        raise InvalidArgument(f"output folder {path.parent} does not exist")


def write_predictions(path: Path, queries: Queries, predictions: np.ndarray,
                      neighbour_ids: np.ndarray, distances: np.ndarray,
                      confidence: np.ndarray | None = None,
                      rejected: np.ndarray | None = None) -> None:
    """One row per query: name, predicted label, true label if known, confidence and whether
    it was rejected (when given), neighbours, distances (squared, in the index's ranking
    space; -1 where no neighbour was found)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_output_path(path)
    integer = distances.dtype.kind == "i"
    missing = distances == (np.iinfo(np.int64).max if integer else np.inf)
    shown = np.where(missing, -1, distances)
    if path.suffix == ".parquet":
        k = neighbour_ids.shape[1]
        columns = {"query": pa.array(queries.names), "predicted": pa.array(predictions)}
        if queries.labels is not None:
            columns["label"] = pa.array(queries.labels)
        if confidence is not None:
            columns["confidence"] = pa.array(confidence, pa.float64())
        if rejected is not None:
            columns["rejected"] = pa.array(rejected, pa.bool_())
        columns["neighbors"] = pa.FixedSizeListArray.from_arrays(
            pa.array(neighbour_ids.ravel(), pa.int64()), k)
        columns["distances"] = pa.FixedSizeListArray.from_arrays(
            pa.array(shown.ravel(), pa.int64() if integer else pa.float64()), k)
        with atomic_path(path) as tmp:
            pq.write_table(pa.table(columns), tmp)
        return
    k = neighbour_ids.shape[1]
    extra = (["confidence"] if confidence is not None else []) + \
        (["rejected"] if rejected is not None else [])
    header = ["query", "predicted", *(["label"] if queries.labels is not None else []), *extra,
              *(f"neighbor_{i + 1}" for i in range(k)), *(f"distance_{i + 1}" for i in range(k))]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for i in range(len(predictions)):
            label = [int(queries.labels[i])] if queries.labels is not None else []
            more = ([round(float(confidence[i]), 6)] if confidence is not None else []) + \
                ([bool(rejected[i])] if rejected is not None else [])
            writer.writerow([queries.names[i], int(predictions[i]), *label, *more,
                             *neighbour_ids[i].tolist(), *shown[i].tolist()])
