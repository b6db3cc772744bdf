"""Feature pipelines: deskew itself, pipelines applied at query time, edited manifests refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import writable_copy
from helpers import assert_clean_error, exact_knn, make_collection, run_cli
from scipy.ndimage import affine_transform

from mnist_ann.api import Collection
from mnist_ann.classify import vote
from mnist_ann.data import pipeline
from mnist_ann.data.pipeline import CENTRE, SIDE, apply_pipeline, deskew, directions
from mnist_ann.evaluation.metrics import recall
from mnist_ann.index.build import build_indexes
from mnist_ann.index.layers import transforms_of
from mnist_ann.index.recipes import resolve_recipe

pytestmark = pytest.mark.slow  # real MNIST digits


def image_moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre of mass and shear cov(r, c) / var(r), computed plainly per image in float64."""
    rows, cols = np.mgrid[:SIDE, :SIDE]
    x = images.reshape(-1, SIDE, SIDE).astype(np.float64)
    total = x.sum((1, 2))
    mean_r = (x * rows).sum((1, 2)) / total
    mean_c = (x * cols).sum((1, 2)) / total
    dr = rows[None] - mean_r[:, None, None]
    dc = cols[None] - mean_c[:, None, None]
    shear = (x * dr * dc).sum((1, 2)) / (x * dr * dr).sum((1, 2))
    return mean_r, mean_c, shear


def shear(images: np.ndarray, alpha: float) -> np.ndarray:
    """Shear each image by alpha (column shift alpha·(row - centre)), bilinear, as uint8."""
    matrix = np.array([[1.0, 0.0], [-alpha, 1.0]])
    offset = np.array([0.0, alpha * CENTRE])
    out = [affine_transform(image.reshape(SIDE, SIDE).astype(np.float64), matrix,
                            offset=offset, order=1) for image in images]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(len(images), -1)


@pytest.fixture(scope="module")
def digits(mnist) -> tuple[np.ndarray, np.ndarray]:
    return mnist.images[:3000], mnist.labels[:3000]


def test_deskew_undoes_a_synthetic_shear(digits) -> None:
    images = digits[0][:300]
    upright = deskew(images)
    for alpha in (-0.6, 0.4):
        sheared = shear(images, alpha)
        _, _, before = image_moments(sheared)
        assert np.median(np.abs(before - image_moments(images)[2] - alpha)) < 0.05
        again = deskew(sheared)
        _, _, after = image_moments(again)
        assert np.abs(after).max() < 0.05  # the shear is gone...
        # ...and the digit is the one deskewed from the unsheared image (up to the rounding
        # and resampling of the synthetic shear), far closer than the sheared image was
        gap = np.abs(again - upright).mean(axis=1)
        sheared_gap = np.abs(sheared.astype(np.float32) - images).mean(axis=1)
        assert np.median(gap) < 0.2 * np.median(sheared_gap)


def test_deskew_centres_each_digit_and_matches_a_per_image_reference(digits) -> None:
    images = digits[0][:500]
    ours = deskew(images)
    mean_r, mean_c, _ = image_moments(ours)
    off_centre = np.maximum(np.abs(mean_r - CENTRE), np.abs(mean_c - CENTRE))
    # exact up to the ink a strong shear pushes past the border
    assert np.median(off_centre) < 1e-4 and np.mean(off_centre < 0.05) > 0.98
    # the classic per-image moment deskew with scipy, bilinear: the affine map maps output
    # (r, c) to input (r + m_r - centre, c + shear·(r - centre) + m_c - centre)
    m_r, m_c, alpha = image_moments(images)
    for i in range(0, 500, 37):
        matrix = np.array([[1.0, 0.0], [alpha[i], 1.0]])
        offset = np.array([m_r[i], m_c[i]]) - matrix @ np.array([CENTRE, CENTRE])
        reference = affine_transform(images[i].reshape(SIDE, SIDE).astype(np.float64), matrix,
                                     offset=offset, order=1)
        np.testing.assert_allclose(ours[i], reference.ravel(), atol=2e-3)
    # one image at a time gives the batch's answer (block boundaries change nothing)
    single = np.concatenate([deskew(images[i:i + 1]) for i in range(0, 500, 50)])
    np.testing.assert_array_equal(single, ours[::50])


def test_deskew_of_empty_and_blank_images(digits) -> None:
    assert deskew(np.zeros((0, 784), np.uint8)).shape == (0, 784)
    blank = deskew(np.zeros((3, 784), np.uint8))
    assert np.all(blank == 0)


def directions_reference(image: np.ndarray) -> np.ndarray:
    """The gradient direction features of one image by the definition, pixel by pixel."""
    import math

    n_dir, grid = pipeline.DIRECTIONS, pipeline.GRID
    x = np.pad(image.reshape(SIDE, SIDE).astype(np.float64) / 255, 1)
    unit = 2 * math.pi / n_dir
    planes = np.zeros((n_dir, SIDE, SIDE))
    for r in range(SIDE):
        for c in range(SIDE):
            w = x[r:r + 3, c:c + 3]  # the 3x3 window around (r, c)
            gx = (w[:, 2] - w[:, 0]) @ [1, 2, 1]  # Sobel, x to the right
            gy = [1, 2, 1] @ (w[2] - w[0])  # y downwards
            if gx == 0 and gy == 0:
                continue
            angle = math.atan2(gy, gx) % (2 * math.pi)
            below = int(angle // unit) % n_dir
            rest = angle - below * unit
            # g = a·u_below + b·u_above, solved for a and b (the law of sines)
            magnitude = math.hypot(gx, gy)
            planes[below, r, c] += magnitude * math.sin(unit - rest) / math.sin(unit)
            planes[(below + 1) % n_dir, r, c] += magnitude * math.sin(rest) / math.sin(unit)
    span = SIDE + 4
    sigma = span / grid / 2
    centres = [(i + 0.5) * span / grid - 0.5 - 2 for i in range(grid)]
    out = np.zeros((n_dir, grid, grid))
    for d in range(n_dir):
        for i, cy in enumerate(centres):
            for j, cx in enumerate(centres):
                total = 0.0
                for r in range(SIDE):
                    for c in range(SIDE):
                        weight = math.exp(-((r - cy) ** 2 + (c - cx) ** 2) / (2 * sigma**2))
                        total += weight * planes[d, r, c]
                out[d, i, j] = total ** pipeline.POWER
    return out.reshape(-1)


def test_directions_match_the_definition(digits) -> None:
    rng = np.random.default_rng(5)
    images = np.concatenate([deskew(digits[0][:3]), rng.integers(0, 256, (2, 784))])
    ours = directions(images)
    assert ours.shape == (5, pipeline.DIRECTIONS * pipeline.GRID**2) and ours.dtype == np.float32
    for image, features in zip(images, ours, strict=True):
        np.testing.assert_allclose(features, directions_reference(image), rtol=1e-3, atol=1e-3)
    # blocks change nothing, and a blank image has no edges
    single = np.concatenate([directions(images[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(single, ours, rtol=1e-6)
    assert np.all(directions(np.zeros((2, 784))) == 0)


def test_an_edge_lands_in_the_plane_of_its_direction() -> None:
    image = np.zeros((SIDE, SIDE))
    image[6:22, 14:22] = 255  # a bright bar: its left edge faces right, its right edge left
    planes = directions(image.reshape(1, -1)).reshape(pipeline.DIRECTIONS, -1).sum(1)
    opposite = pipeline.DIRECTIONS // 2
    quarter = pipeline.DIRECTIONS // 4
    assert planes[0] > 0 and planes[opposite] > 0  # +x and -x
    assert planes[quarter] > 0 and planes[3 * quarter] > 0  # the top and bottom edges
    # the long sides (16 pixels) outweigh the short ones (8) and any slanted direction
    assert planes[0] > planes[quarter] and planes[0] > 2 * planes[1]
    turned = directions(image.T.reshape(1, -1)).reshape(pipeline.DIRECTIONS, -1).sum(1)
    np.testing.assert_allclose(turned[quarter], planes[0], rtol=1e-5)  # x and y swapped


@pytest.fixture(scope="module")
def real(digits, tmp_path_factory: pytest.TempPathFactory) -> Collection:
    store = tmp_path_factory.mktemp("pipeline-store")
    collection = make_collection(store, "mini", *digits)
    build_indexes(collection, [resolve_recipe(name, len(collection.train()))
                               for name in ("flat", "deskew-flat", "deskew-pca-ivf",
                                            "directions-ivf")], threads=2)
    return Collection.open(store, "mini")


def brute_force(train: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Squared L2 in float64 over float features, ordered by (distance, row)."""
    t, q = train.astype(np.float64), queries.astype(np.float64)
    distances = np.concatenate([((q[i:i + 16, None, :] - t[None]) ** 2).sum(-1)
                                for i in range(0, len(q), 16)])
    order = np.lexsort((np.broadcast_to(np.arange(len(t)), distances.shape), distances), axis=1)
    return np.take_along_axis(distances, order[:, :k], 1), order[:, :k]


def test_cli_query_applies_the_index_pipeline(real: Collection, tmp_path: Path) -> None:
    train, test = real.train(), real.test()
    output = tmp_path / "predictions.parquet"
    result = run_cli("query", "--store", real.root.parent, "--collection", "mini", "--index",
                     "deskew-flat", "--output", output, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["space"] == "deskew"
    table = pq.read_table(output)
    found_ids = np.array(table.column("neighbors").to_pylist())
    row_of_id = {int(mnist_id): row for row, mnist_id in enumerate(train.ids)}
    rows = np.vectorize(row_of_id.__getitem__)(found_ids)

    deskewed_train, deskewed_test = deskew(train.pixels), deskew(test.pixels)
    true_distances, true_rows = brute_force(deskewed_train, deskewed_test, 7)
    found = ((deskewed_test[:, None, :].astype(np.float64)
              - deskewed_train[rows].astype(np.float64)) ** 2).sum(-1)
    assert recall(found, true_distances, 7) == 1.0
    np.testing.assert_allclose(np.array(table.column("distances").to_pylist()), found,
                               rtol=1e-5)
    votes = vote(train.labels[true_rows].astype(np.int16), true_distances, np.arange(10))
    assert np.mean(table.column("predicted").to_numpy() == votes) > 0.995

    # the test would fail had the pixels been searched instead: their neighbours differ
    _, pixel_rows = exact_knn(train.pixels, test.pixels, 7)
    differs = np.mean([set(a) != set(b) for a, b in zip(rows, pixel_rows, strict=True)])
    assert differs > 0.3


@pytest.mark.parametrize(("name", "steps", "dimension"), [
    ("deskew-pca-ivf", ("deskew",), 48),
    ("directions-ivf", ("deskew", "directions"), 64),
])
def test_pca_index_ranks_in_its_own_space_and_is_exact_at_full_probe(
        real: Collection, name: str, steps: tuple[str, ...], dimension: int) -> None:
    knn = real.searcher(name)
    assert knn.space.description == " → ".join([*steps, "L2norm", f"PCA{dimension}"])
    test = real.test()
    features = knn.space.embed(test.pixels)
    assert features.shape == (len(test), dimension)
    expected = apply_pipeline(steps, test.pixels)
    for transform in transforms_of(knn.owner):
        expected = transform.apply(expected)
    np.testing.assert_array_equal(features, expected)
    true_distances, _ = brute_force(knn.space.features, features, 7)
    nlist = real.indexes[name]["build_args"]["nlist"]
    everything = knn.search(test.pixels, 7, {"nprobe": nlist})
    assert recall(everything.distances, true_distances, 7) == 1.0
    low = knn.search(test.pixels, 7, {"nprobe": 1})
    assert recall(low.distances, true_distances, 7) < 1.0


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda entry, other: entry.update(pipeline=[]), "pipeline"),
    (lambda entry, other: entry.update(rank_space="index"), "rank_space"),
    (lambda entry, other: entry.pop("record"), "no build record"),
    (lambda entry, other: entry.update(record=other["record"]), "another index file"),
])
def test_manifest_with_an_edited_pipeline_is_refused(real: Collection, tmp_path: Path, edit,
                                                     fragment: str) -> None:
    copy = writable_copy(real, tmp_path / "store")
    manifest_path = copy.root / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    edit(manifest["indexes"]["deskew-flat"], manifest["indexes"]["flat"])
    manifest_path.write_text(json.dumps(manifest))
    result = run_cli("query", "--store", copy.root.parent, "--collection", "mini",
                     "--index", "deskew-flat", "--output", tmp_path / "out.csv")
    assert_clean_error(result, 1, fragment)
    assert not (tmp_path / "out.csv").exists()
    assert run_cli("query", "--store", real.root.parent, "--collection", "mini", "--index",
                   "deskew-flat").exit_code == 0
