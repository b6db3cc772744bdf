"""MNIST-style normalisation of real images: MNIST's own digits come back byte for byte, and
photos, drawings and dark-on-light pictures of digits become digits the index recognises, with
the same answer from the command line, from Python and from the web service."""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from helpers import SEVEN, canvas_drawing, dark_on_light_png, photo_of_digit, run_cli

from mnist_ann.api import Collection, Store
from mnist_ann.data.normalize import normalize
from mnist_ann.errors import DataError, InvalidArgument


def png(array: np.ndarray, mode: str | None = None, **save) -> bytes:
    from PIL import Image

    buffer = BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG", **save)
    return buffer.getvalue()


@pytest.mark.slow
def test_mnist_digits_come_back_byte_for_byte(mnist) -> None:
    digits = mnist.images.reshape(-1, 28, 28)
    same = sum(np.array_equal(normalize(digit, "mnist").pixels, digit) for digit in digits)
    assert same / len(digits) >= 0.999, same
    # auto passes a 28x28 white-on-black digit through untouched
    assert np.array_equal(normalize(png(digits[0])).pixels, digits[0])
    assert normalize(png(digits[0])).record["mode"] == "none"


def test_the_box_is_20_pixels_and_the_mass_centred() -> None:
    grey = np.zeros((300, 200), np.float32)
    grey[40:240, 60:110] = 255  # a tall bar, off-centre
    result = normalize(grey, "canvas")
    rows, cols = np.nonzero(result.pixels)
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 <= 6
    mass = result.pixels.astype(float)
    centre = [(mass.sum(axis) * np.arange(28)).sum() / mass.sum() for axis in (1, 0)]
    assert all(abs(c - 14) <= 0.5 for c in centre), centre
    assert result.record["box"] == [60, 40, 110, 240] and result.record["inverted"] is False


def test_a_photo_is_inverted_lit_evenly_and_cleaned_of_specks(seed_collection) -> None:
    digit = seed_collection.test().pixels[3]
    result = normalize(photo_of_digit(digit, seed=3))
    record = result.record
    assert record["mode"] == "photo" and record["inverted"] is True
    assert record["components"]["found"] > record["components"]["kept"] >= 1
    reference = normalize(digit.reshape(28, 28), "mnist").pixels.astype(float).ravel()
    assert np.corrcoef(reference, result.pixels.astype(float).ravel())[0, 1] > 0.8


def test_a_digit_in_two_strokes_stays_whole_and_specks_go() -> None:
    grey = np.full((280, 280), 255, np.uint8)
    grey[40:250, 72:88] = 0  # a 4 drawn in two strokes that do not touch: the stem ...
    grey[36:44, 150:210] = 0  # ... and a bar
    for y, x in [(10, 10), (270, 200), (150, 260)]:  # and three specks of dirt
        grey[y:y + 2, x:x + 2] = 0
    record = normalize(png(grey), "photo").record
    assert record["components"] == {"found": 5, "kept": 2}
    assert record["box"] == [72, 36, 210, 250]


@pytest.mark.parametrize("blank", [np.full((120, 90), 255, np.uint8),
                                   np.zeros((28, 28), np.uint8),
                                   np.full((64, 64), 128, np.uint8)])
def test_an_image_without_a_digit_is_refused(blank: np.ndarray) -> None:
    with pytest.raises(DataError, match="no digit found"):
        normalize(png(blank))


def test_modes_16_bit_palette_transparency_and_rotation_give_the_same_digit() -> None:
    from PIL import Image

    grey = np.full((160, 120), 255, np.uint8)
    grey[30:130, 50:66] = 0
    grey[30:46, 30:66] = 0
    expected = normalize(png(grey), "photo").pixels
    wide = (grey.astype(np.uint16) * 257)
    sixteen = BytesIO()
    Image.fromarray(wide).save(sixteen, format="PNG")
    assert Image.open(BytesIO(sixteen.getvalue())).mode.startswith("I")
    palette = Image.fromarray(grey).convert("P")
    rgba = np.zeros((160, 120, 4), np.uint8)
    rgba[..., 3] = 255 - grey  # black ink on a transparent canvas
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: the file holds the picture rotated
    rotated = Image.fromarray(grey).transpose(Image.Transpose.ROTATE_90)
    variants = {"16-bit": sixteen.getvalue(), "palette": png_of(palette),
                "rgba": png(rgba, "RGBA"), "exif": png_of(rotated, exif=exif.tobytes())}
    for name, data in variants.items():
        result = normalize(data, "canvas" if name == "rgba" else "photo")
        assert np.abs(result.pixels.astype(int) - expected).max() <= 2, name


def png_of(image, **save) -> bytes:
    buffer = BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def test_unknown_mode_and_wrong_arrays() -> None:
    with pytest.raises(InvalidArgument, match="not one of"):
        normalize(np.zeros((28, 28)), "magic")
    with pytest.raises(DataError, match=r"0\.\.255"):
        normalize(np.full((28, 28), 300.0), "mnist")
    with pytest.raises(DataError, match="must be 28x28"):
        normalize(np.full((30, 30), 9.0), "none")


# --- the same answer everywhere ------------------------------------------------------------

@pytest.fixture(scope="module")
def real_images(seed_collection, tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """A photo of ink on paper, a canvas drawing and a 200x160 dark-on-light PNG, with the
    digit each shows."""
    folder = tmp_path_factory.mktemp("real-images")
    test = seed_collection.test()
    (folder / "photo.jpg").write_bytes(photo_of_digit(test.pixels[0], seed=0))
    (folder / "canvas.png").write_bytes(canvas_drawing(SEVEN))
    (folder / "dark-on-light.png").write_bytes(dark_on_light_png(test.pixels[1]))
    return folder, {"photo.jpg": int(test.labels[0]), "canvas.png": 7,
                    "dark-on-light.png": int(test.labels[1])}


def test_real_images_get_the_same_answer_from_cli_python_and_serve(
        seed_collection: Collection, real_images, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from mnist_ann.serve.app import create_app
    from mnist_ann.serve.service import ClassifyService

    folder, truth = real_images
    out = tmp_path / "predictions.csv"
    result = run_cli("query", "--store", seed_collection.root.parent, "--collection", "seed",
                     "--index", "hnsw", "--input", folder, "--output", out, "-q")
    assert result.exit_code == 0, result.stderr
    lines = [line.split(",") for line in out.read_text().splitlines()[1:]]
    from_cli = {name: int(predicted) for name, predicted, *_ in lines}

    collection = Store(seed_collection.root.parent)["seed"]
    classifier = collection.classifier("hnsw")
    from_python = {name: int(classifier.predict(
        normalize(folder / name).pixels.reshape(1, 784))[0]) for name in truth}

    client = TestClient(create_app(ClassifyService(collection, ["hnsw"])))
    kinds = {"jpg": "image/jpeg", "png": "image/png"}
    from_serve = {}
    for name in truth:
        answer = client.post("/v1/classify", content=(folder / name).read_bytes(),
                             headers={"Content-Type": kinds[name.rsplit(".", 1)[1]]})
        assert answer.status_code == 200, answer.text
        from_serve[name] = answer.json()["prediction"]
    assert from_cli == from_python == from_serve == truth


def test_normalize_command_writes_digits_and_a_grid(real_images, tmp_path: Path) -> None:
    folder, truth = real_images
    result = run_cli("normalize", folder, "--out", tmp_path / "out", "--json", "-q")
    assert result.exit_code == 0, result.stderr
    records = json.loads(result.stdout)
    assert [Path(r["file"]).name for r in records] == sorted(truth)
    for record in records:
        written = Path(record["out"])
        assert np.array_equal(normalize(written, "none").pixels,
                              normalize(Path(record["file"])).pixels)
    assert (tmp_path / "out" / "before-after.png").read_bytes()[:4] == b"\x89PNG"
