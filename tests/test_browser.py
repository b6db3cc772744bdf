"""The drawing page in a real browser: Debian's Chromium headless shell (installed by `make
test`, never by a test), driven by playwright, draws digits with the mouse over a real HTTP
server and reads the prediction and the neighbours off the page."""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from helpers import browser_path

from mnist_ann.api import Collection, Store
from mnist_ann.serve.app import create_app
from mnist_ann.serve.service import ClassifyService

# MNIST_ANN_SCREENSHOT=docs/serve.png makes the README's picture of the page
SCREENSHOT = os.environ.get("MNIST_ANN_SCREENSHOT")


@pytest.fixture(scope="module")
def server(seed_collection: Collection) -> Iterator[tuple[str, ClassifyService]]:
    """The real server (uvicorn) on a free loopback port, over the real seed collection."""
    import uvicorn

    service = ClassifyService(Store(seed_collection.root.parent)["seed"], ["hnsw", "flat"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                            log_level="warning")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not running.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", service
    running.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def page(server) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path(),
                                             args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 900, "height": 760})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server[0] + "/")
        page.wait_for_selector("#index option", state="attached")
        yield page
        assert not errors, errors
        browser.close()


def draw(page, strokes: list[list[tuple[int, int]]]) -> None:
    """Draw with the mouse, in canvas pixels (the pad is 280x280 on the page)."""
    page.click("#clear")
    box = page.locator("#pad").bounding_box()
    for stroke in strokes:
        page.mouse.move(box["x"] + stroke[0][0], box["y"] + stroke[0][1])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x, box["y"] + y, steps=12)
        page.mouse.up()


def read_result(page, previous: str) -> tuple[str, list[tuple[str, str]]]:
    """The prediction and neighbours once the answer to the last drawing is shown."""
    page.wait_for_function(
        """(previous) => {
             const shown = document.querySelector('#neighbours').dataset.stamp || '';
             return shown !== previous && shown === document.querySelector('#pad').dataset.sent;
           }""", arg=previous, timeout=20_000)
    prediction = page.inner_text("#prediction")
    neighbours = page.eval_on_selector_all(
        "#neighbours figure",
        "figures => figures.map(f => [f.dataset.label, f.querySelector('img').src])")
    return prediction, neighbours


def canvas_png(page) -> bytes:
    url = page.evaluate("document.getElementById('pad').toDataURL('image/png')")
    return base64.b64decode(url.split(",", 1)[1])


@pytest.mark.parametrize(("digit", "strokes"), [
    ("1", [[(140, 40), (142, 140), (144, 245)]]),
    ("7", [[(60, 50), (220, 50), (170, 140), (120, 245)], [(100, 145), (200, 145)]]),
    ("0", [[(140, 40), (80, 80), (70, 150), (95, 225), (140, 245), (190, 220), (210, 150),
            (200, 80), (140, 40)]]),
])
def test_drawing_a_digit_shows_its_prediction_and_neighbours(page, server, digit: str,
                                                             strokes) -> None:
    base, service = server
    previous = page.evaluate("document.querySelector('#neighbours').dataset.stamp || ''")
    draw(page, strokes)
    prediction, neighbours = read_result(page, previous)
    assert prediction == digit
    assert len(neighbours) == 7 and all(src.startswith(base + "/v1/digits/")
                                        for _, src in neighbours)
    # the neighbours' pictures loaded from the server
    page.wait_for_function("[...document.querySelectorAll('#neighbours img')]"
                           ".every(img => img.complete && img.naturalWidth === 28)",
                           timeout=10_000)
    # the page shows what the API answers for the same drawing
    answer = service.classify_image(canvas_png(page), "image/png", "hnsw", 7, {}, "canvas")
    assert str(answer["prediction"]) == prediction
    assert [str(n["label"]) for n in answer["neighbours"]] == [label for label, _ in neighbours]
    if digit == "7" and SCREENSHOT:
        page.screenshot(path=SCREENSHOT)
