"""Hostile and malformed input: every file, parameter and name a user can hand the tool is
refused with one line and the right exit code before anything is allocated for it or written,
and the bombs leave memory small."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import cli, finish, idx_bytes, one_error_line, tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mnist_ann.api import Collection
from mnist_ann.data.mnist import IDX_IMAGE_MAGIC, IDX_LABEL_MAGIC, read_idx_file
from mnist_ann.data.queries import read_images, read_npy
from mnist_ann.data.tables import read_parquet
from mnist_ann.errors import DataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(shared, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the shared synthetic collection (flat, hnsw, ivf)."""
    root = tmp_path_factory.mktemp("hostile-store")
    shutil.copytree(shared("syn").root, root / "syn")
    return root


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    return folder


def refused(store: Path, *args: str, code: int = 1, fragment: str,
            cwd: Path | None = None) -> tuple[str, int]:
    """Run a command that must be refused: the exit code, one `Error:` line containing
    `fragment` (for `verify`, which names each problem on stdout, there), no traceback,
    nothing written to the store (or to `cwd`). Returns the line and the command's peak
    memory in KB."""
    before = tree(store), tree(cwd) if cwd else {}
    process_code, out, err = finish(cli(store, *args, measure=True, cwd=cwd))
    assert process_code == code, err
    line = one_error_line(err)
    shown = out + line if args[0] == "verify" else line
    assert fragment.lower() in shown.lower(), (line, out)
    assert (tree(store), tree(cwd) if cwd else {}) == before
    return shown, peak_kb(err)


def peak_kb(stderr: str) -> int:
    return int(next(line.split()[1] for line in stderr.splitlines()
                    if line.startswith("peak-rss-kb")))


def query(store: Path, source: Path, fragment: str, **kwargs) -> tuple[str, int]:
    return refused(store, "query", "--collection", "syn", "--input", source, "--output",
                   source.parent / "out.csv", fragment=fragment, cwd=source.parent, **kwargs)


def npy_header(shape: tuple, descr: str = "<u1") -> bytes:
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}".ljust(117)
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text) + 1) + text.encode() + b"\n"


def png_header(width: int, height: int, mode_byte: int = 0) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode_byte, 0, 0, 0)
    return PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def small_png() -> bytes:
    from io import BytesIO

    from PIL import Image

    buffer = BytesIO()
    digit = np.zeros((28, 28), np.uint8)  # a noisy square: its data fills several hundred bytes
    digit[4:24, 4:24] = np.random.default_rng(0).integers(1, 256, (20, 20), dtype=np.uint8)
    Image.fromarray(digit).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def baseline_kb(store: Path, tmp_path_factory: pytest.TempPathFactory) -> int:
    """The peak memory of the same command refusing a file at once (libraries loaded)."""
    tiny = tmp_path_factory.mktemp("baseline") / "tiny"
    tiny.write_bytes(b"\0" * 16)
    return query(store, tiny, "magic number")[1]


# --- .npy ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "fragment"), [
    (npy_header((1_000_000_000_000, 784)) + b"\0" * 72, "more than the 2,000,000"),
    (npy_header((1_000_000, 784)) + b"\0" * 72, "promises 784,000,000 bytes"),
    (npy_header((2, 784), "<f8") + b"\0" * 100, "the file holds 100"),
    (npy_header((2, 784), "|O") + b"\0" * 100, "not numbers"),
    (npy_header((2, 783)) + b"\0" * 1566, "expected [n, 784]"),
    (b"\x93NUMPY\x01\x00\xff\xff{'descr'", "not a readable .npy"),
])
def test_npy_whose_header_lies_is_refused_before_allocating(store: Path, inputs: Path,
                                                            baseline_kb: int, content: bytes,
                                                            fragment: str) -> None:
    source = inputs / "hostile.npy"
    source.write_bytes(content)
    _, peak = query(store, source, fragment)
    assert peak < baseline_kb + 32_000


def test_npy_of_objects_is_refused_without_unpickling(store: Path, inputs: Path) -> None:
    np.save(inputs / "objects.npy", np.array([[object()] * 784], dtype=object),
            allow_pickle=True)
    query(store, inputs / "objects.npy", "holds object, not numbers")


# --- IDX -----------------------------------------------------------------------------------

def test_a_gzip_bomb_is_not_inflated(store: Path, inputs: Path, baseline_kb: int) -> None:
    bomb = inputs / "bomb-idx3-ubyte.gz"
    zeros = b"\0" * (1 << 20)
    with gzip.open(bomb, "wb", compresslevel=1) as handle:  # 10 images, then 256 MB more
        handle.write(struct.pack(">IIII", IDX_IMAGE_MAGIC, 10, 28, 28))
        for _ in range(256):
            handle.write(zeros)
    assert bomb.stat().st_size < 2_000_000
    _, peak = query(store, bomb, "longer than its header says")
    assert peak < baseline_kb + 32_000


@pytest.mark.parametrize(("count", "payload", "fragment"), [
    (4_000_000_000, 1000, "claims 4,000,000,000 items"),
    (1_999_999, 1000, "truncated"),  # a claim within the cap, but no data behind it
])
def test_an_idx_header_claiming_millions_of_images_costs_nothing(store: Path, inputs: Path,
                                                                 baseline_kb: int, count: int,
                                                                 payload: int,
                                                                 fragment: str) -> None:
    source = inputs / "claim-idx3-ubyte.gz"
    source.write_bytes(gzip.compress(struct.pack(">IIII", IDX_IMAGE_MAGIC, count, 28, 28)
                                     + b"\0" * payload))
    _, peak = query(store, source, fragment)
    assert peak < baseline_kb + 32_000


def test_idx_labels_that_do_not_match_the_images(store: Path, inputs: Path) -> None:
    (inputs / "images").write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8), IDX_IMAGE_MAGIC))
    (inputs / "labels").write_bytes(idx_bytes(np.zeros(2, np.uint8), IDX_LABEL_MAGIC))
    refused(store, "query", "--collection", "syn", "--input", inputs / "images", "--labels",
            inputs / "labels", fragment="2 labels for 3 images", cwd=inputs)


# --- Parquet -------------------------------------------------------------------------------

def pixels(n: int, nulls: bool = False) -> pa.Array:
    return pa.array([None if nulls and i else b"\0" * 784 for i in range(n)], pa.binary(784))


@pytest.mark.parametrize(("columns", "fragment"), [
    ({"id": [1, 2], "label": [1, 2], "pixels": pixels(2, nulls=True)}, "'pixels' has empty"),
    ({"id": [1, 2], "label": [1, 12], "pixels": pixels(2)}, "labels outside 0..9"),
    ({"id": [1, 2], "label": [-1, 2], "pixels": pixels(2)}, "labels outside 0..9"),
    ({"id": [1, 2], "label": [1, None], "pixels": pixels(2)}, "some rows have labels"),
    ({"id": ["a", "b"], "label": [1, 2], "pixels": pixels(2)}, "'id' is string"),
    ({"id": [1, None], "pixels": pixels(2)}, "'id' has missing values"),
    ({"id": [1, 2], "label": [1.5, 2.0], "pixels": pixels(2)}, "'label' is double"),
    ({"id": [1, 2], "label": ["1", "2"], "pixels": pixels(2)}, "'label' is string"),
    ({"id": [1, 2], "pixels": pa.array([[0.5] * 784] * 2)}, "'pixels' is list<"),
    ({"id": [1], "pixels": pa.array([[0] * 783 + [None]])}, "'pixels' has missing values"),
    ({"id": [1, 2], "image": pixels(2)}, "no 'pixels' column"),
])
def test_malformed_parquet_is_refused(store: Path, inputs: Path, columns: dict,
                                      fragment: str) -> None:
    pq.write_table(pa.table(columns), inputs / "bad.parquet")
    query(store, inputs / "bad.parquet", fragment)


def test_parquet_that_is_not_parquet(store: Path, inputs: Path) -> None:
    (inputs / "bad.parquet").write_bytes(b"PAR1" + b"\xff" * 64 + b"PAR1")
    query(store, inputs / "bad.parquet", "not a readable Parquet file")


def test_parquet_with_more_rows_than_allowed_is_refused_on_its_metadata(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": np.arange(5), "pixels": pixels(5)}), path)
    with pytest.raises(DataError, match="5 rows"):
        read_parquet(path, max_rows=4)
    assert len(read_parquet(path, max_rows=5).ids) == 5


# --- images --------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "fragment"), [
    (png_header(100_000, 100_000), "more pixels than mnist-ann decodes"),
    (png_header(7_000, 7_000), "7000x7000 pixels is more than"),
    (small_png()[:400], "damaged or truncated"),
    (b"\xff\xd8\xff\xe0" + b"\0" * 200, "not a readable PNG"),  # a JPEG named .png
    (b"just some text", "not a readable PNG"),
])
def test_hostile_png_is_refused_before_decoding(store: Path, inputs: Path, baseline_kb: int,
                                                content: bytes, fragment: str) -> None:
    folder = inputs / "pngs"
    folder.mkdir()
    (folder / "a-good.png").write_bytes(small_png())
    (folder / "b-bad.png").write_bytes(content)
    line, peak = query(store, folder, fragment)
    assert "b-bad.png" in line
    assert peak < baseline_kb + 32_000


def test_a_jpeg_named_png_is_refused(store: Path, inputs: Path) -> None:
    from PIL import Image

    folder = inputs / "pngs"
    folder.mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / "digit.png", format="JPEG")
    query(store, folder, "digit.png: not a readable PNG")


def test_an_empty_folder_is_refused(store: Path, inputs: Path) -> None:
    (inputs / "empty").mkdir()
    (inputs / "empty" / "notes.txt").write_text("no images here")
    query(store, inputs / "empty", "no .png, .jpg or .webp images")


# --- search parameters ---------------------------------------------------------------------

@pytest.mark.parametrize(("index", "param", "fragment"), [
    ("hnsw", "efSearch=1000000000000", "at most 65536"),
    ("hnsw", "efSearch=1e12", "whole number"),
    ("hnsw", "efSearch=-1", "at least 1"),
    ("hnsw", "efSearch=0", "at least 1"),
    ("hnsw", "candidates=-7", "at least"),
    ("ivf", "nprobe=100000", "at most"),
    ("ivf", "nprobe=-3", "at least 1"),
    ("hnsw", "efSearch=nan", "efSearch"),
    ("hnsw", "efSearch=inf", "efSearch"),
])
def test_search_parameters_beyond_what_faiss_accepts(store: Path, inputs: Path, index: str,
                                                     param: str, fragment: str) -> None:
    refused(store, "query", "--collection", "syn", "--index", index, "--param", param,
            "--output", inputs / "out.csv", code=2, fragment=fragment, cwd=inputs)


# --- names and manifests -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["..", "../syn", "a/b", ".hidden", "x" * 65])
@pytest.mark.parametrize("command", [
    ["query", "--collection"], ["build", "--index", "flat", "--collection"], ["verify"],
    ["drop"], ["tune", "--index", "hnsw", "--recall", "0.9", "--collection"],
])
def test_names_that_could_escape_the_store(store: Path, inputs: Path, command: list[str],
                                           name: str) -> None:
    refused(store, *command, name, code=2, fragment="collection name", cwd=inputs)


@pytest.mark.parametrize("name", ["../x", "a/b", ".x", "x/../../y"])
def test_index_names_that_could_escape_the_collection(store: Path, inputs: Path,
                                                      name: str) -> None:
    refused(store, "build", "--collection", "syn", "--index", f"{name}=Flat", code=2,
            fragment=f"index name '{name}'", cwd=inputs)
    refused(store, "drop", "syn", "--index", name, fragment=f"no index '{name}'", cwd=inputs)


@pytest.fixture
def damaged(store: Path, tmp_path: Path) -> Path:
    """A copy of the store whose manifest the test may damage."""
    copy = tmp_path / "damaged"
    shutil.copytree(store, copy)
    return copy


def edit_manifest(store: Path, edit) -> None:
    path = store / "syn" / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("content", [b"not json{", b"", b"[1, 2]", b"\xff\xfe" * 10,
                                     b'{"schema_version": 2}', b"1" * 5_000_000])
def test_a_manifest_that_is_not_a_manifest(damaged: Path, inputs: Path, content: bytes) -> None:
    (damaged / "syn" / "manifest.json").write_bytes(content)
    for command in (["query", "--collection", "syn"], ["verify", "syn"],
                    ["build", "--collection", "syn", "--index", "hnsw", "--force"]):
        line, _ = refused(damaged, *command, fragment="manifest", cwd=inputs)
        assert f"`mnist-ann drop syn --store {damaged}` and build it again" in line, line


@pytest.mark.parametrize(("edit", "bad"), [
    (lambda m: m["indexes"]["hnsw"].update(file="../../outside.faiss"), "../../outside.faiss"),
    (lambda m: m["indexes"]["hnsw"].update(record="/etc/passwd"), "/etc/passwd"),
    (lambda m: m["files"].update({"../train.parquet": m["files"]["train.parquet"]}),
     "../train.parquet"),
])
def test_a_manifest_entry_pointing_outside_its_collection(damaged: Path, inputs: Path, edit,
                                                          bad: str) -> None:
    (damaged / "outside.faiss").write_bytes(b"not for reading")
    edit_manifest(damaged, edit)
    for command in (["query", "--collection", "syn", "--index", "hnsw"], ["verify", "syn"]):
        line, _ = refused(damaged, *command, fragment="not a plain file name", cwd=inputs)
        assert bad in line


# --- random bytes never crash a reader -----------------------------------------------------

PREFIXES = [b"", struct.pack(">IIII", IDX_IMAGE_MAGIC, 2, 28, 28), b"\x1f\x8b\x08\x00",
            b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00", PNG_MAGIC, png_header(28, 28)[:33]]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from(PREFIXES), tail=st.binary(max_size=2000))
def test_random_bytes_never_crash_a_reader(prefix: bytes, tail: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "input.png"
        path.write_bytes(prefix + tail)
        for read in (lambda: read_idx_file(path, IDX_IMAGE_MAGIC), lambda: read_npy(path),
                     lambda: read_images([Path(folder)])):
            try:
                result = read()
            except DataError as exc:
                assert "\n" not in str(exc).strip()
            else:  # what a reader accepts is what it promises
                assert hasattr(result, "pixels") or isinstance(result, np.ndarray)


def test_the_collection_is_untouched_by_all_of_it(store: Path) -> None:
    assert Collection.open(store, "syn").problems() == []
