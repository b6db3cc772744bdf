"""The web service in-process: every endpoint, every refusal as problem+json with its 4xx,
answers equal to the library's (and the neighbours to exact search), the server still serving
after each bad request, and concurrent requests answered as serial ones are."""

from __future__ import annotations

import json
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO

import numpy as np
import pytest
from helpers import exact_knn

from mnist_ann.api import Collection
from mnist_ann.serve.app import create_app
from mnist_ann.serve.service import ClassifyService


@pytest.fixture(scope="module")
def collection(shared) -> Collection:
    return Collection.open(shared("syn").root.parent, "syn")


@pytest.fixture(scope="module")
def service(collection: Collection) -> ClassifyService:
    return ClassifyService(collection, ["hnsw", "flat"])


@pytest.fixture(scope="module")
def client(service: ClassifyService):
    from fastapi.testclient import TestClient

    with TestClient(create_app(service), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def queries(collection: Collection) -> np.ndarray:
    return collection.test().pixels[:20]


def png(pixels: np.ndarray, size: tuple[int, int] | None = None) -> bytes:
    from PIL import Image

    image = Image.fromarray(pixels.reshape(28, 28))
    if size:
        image = image.resize(size)
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_indexes_and_digits(client, collection: Collection) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "collection": "syn",
                                             "indexes": ["hnsw", "flat"]}
    served = client.get("/v1/indexes").json()
    assert served["default"] == "hnsw"
    assert [i["name"] for i in served["indexes"]] == ["hnsw", "flat"]
    assert served["indexes"][0]["parameters"] == ["efSearch"]
    train, test = collection.train(), collection.test()
    for table in (train, test):
        answer = client.get(f"/v1/digits/{table.ids[5]}.png")
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        assert "immutable" in answer.headers["cache-control"]
        from PIL import Image

        shown = np.asarray(Image.open(BytesIO(answer.content))).ravel()
        assert np.array_equal(shown, table.pixels[5])


def test_pages_work_offline(client) -> None:
    page = client.get("/").text
    assert "<canvas" in page and "/v1/classify" in page
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/v1/classify" in docs.text
    for text in (page, docs.text):
        assert "http://" not in text and "https://" not in text  # nothing from the internet
    schema = client.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/indexes", "/v1/digits/{digit_id}.png",
            "/healthz"} <= set(schema["paths"])


def test_one_image_as_the_library_answers_it(client, collection: Collection,
                                             queries: np.ndarray) -> None:
    classifier = collection.classifier("flat")
    expected = classifier.classify(queries[:1])
    for pixels in (queries[0].tolist(), queries[0].reshape(28, 28).tolist()):
        answer = client.post("/v1/classify", json={"pixels": pixels, "index": "flat"})
        assert answer.status_code == 200, answer.text
        result = answer.json()
        assert result["prediction"] == int(expected.predictions[0])
        assert [n["id"] for n in result["neighbours"]] == expected.neighbour_ids[0].tolist()
        assert result["index"] == "flat" and result["k"] == 7
        assert sum(result["votes"].values()) == 7
        assert result["confidence"] == pytest.approx(expected.proba[0].max())


def test_a_batch_on_an_approximate_index_matches_exact_search(client, collection: Collection,
                                                              queries: np.ndarray) -> None:
    answer = client.post("/v1/classify", json={
        "instances": [{"pixels": q.tolist()} for q in queries], "k": 5,
        "params": {"efSearch": 128}})
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    train = collection.train()
    distances, rows = exact_knn(train.pixels, queries, 5)
    for result, exact_rows, exact_distances in zip(results, rows, distances, strict=True):
        assert [n["distance"] for n in result["neighbours"]] == exact_distances.tolist()
        assert [n["id"] for n in result["neighbours"]] == train.ids[exact_rows].tolist()
        assert result["params"] == {"efSearch": 128} and result["timings"]["batch"] == 20


def test_uploaded_images_raw_and_multipart(client, collection: Collection,
                                           queries: np.ndarray) -> None:
    expected = collection.classifier("flat", k=3).predict(queries[:1])[0]
    # the synthetic digits are noise to the eye: sent as they are, not normalised
    raw = client.post("/v1/classify?index=flat&k=3&normalize=none", content=png(queries[0]),
                      headers={"Content-Type": "image/png"})
    assert raw.status_code == 200, raw.text
    result = raw.json()
    assert result["prediction"] == expected and result["k"] == 3
    assert result["normalized"]["mode"] == "none"
    assert np.array_equal(np.array(result["normalized"]["pixels"]).ravel(), queries[0])
    assert result["normalized"]["png"].startswith("data:image/png;base64,")
    form = client.post("/v1/classify?index=flat&k=3&normalize=none",
                       files={"image": ("d.png", png(queries[0]), "image/png")})
    assert form.status_code == 200, form.text
    assert form.json()["prediction"] == expected
    bigger = client.post("/v1/classify?index=hnsw&param.efSearch=64",
                         content=png(dark_bar_on_white(), (112, 112)),
                         headers={"Content-Type": "image/png"})
    assert bigger.status_code == 200, bigger.text
    assert bigger.json()["normalized"]["inverted"] is True
    assert bigger.json()["params"] == {"efSearch": 64}


def dark_bar_on_white() -> np.ndarray:
    image = np.full((28, 28), 255, np.uint8)
    image[4:24, 12:16] = 0
    return image


def bomb_png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 0,
                                                               0, 0, 0)) + chunk(b"IEND", b""))


PIXELS = [0] * 784


@pytest.mark.parametrize(("body", "content_type", "status", "fragment"), [
    (b"{not json", "application/json", 400, "not JSON"),
    (b"[1, 2]", "application/json", 422, "JSON object"),
    (json.dumps({"pixels": [1, 2]}).encode(), "application/json", 422, "has 2 values"),
    (json.dumps({"pixels": [300] * 784}).encode(), "application/json", 422, "0..255"),
    (json.dumps({"pixels": [0.5] * 784}).encode(), "application/json", 422, "whole numbers"),
    (json.dumps({"pixels": ["a"] * 784}).encode(), "application/json", 422, "number"),
    (json.dumps({"pixels": [[0] * 27] * 28}).encode(), "application/json", 422, "28 rows"),
    (json.dumps({"instances": []}).encode(), "application/json", 422, "1 to 1000"),
    (json.dumps({"pixels": PIXELS, "index": "annoy"}).encode(), "application/json", 404,
     "'annoy' is not served"),
    (json.dumps({"pixels": PIXELS, "k": 0}).encode(), "application/json", 422, "k must"),
    (json.dumps({"pixels": PIXELS, "params": {"nprobe": 4}}).encode(), "application/json",
     422, "nprobe"),
    (json.dumps({"pixels": PIXELS, "params": {"efSearch": 10**12}}).encode(),
     "application/json", 422, "at most"),
    (b"hello", "text/plain", 415, "not one of"),
    (b"GIF89a" + b"\0" * 50, "image/gif", 415, "image/gif"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png", 415, "not a readable PNG"),
    (b"\xff\xd8\xff" + b"\0" * 40, "image/png", 415, "not a readable PNG"),
    (bomb_png(), "image/png", 422, "more pixels than"),
])
def test_bad_requests_are_problems_and_the_server_keeps_serving(client, body: bytes,
                                                                content_type: str,
                                                                status: int,
                                                                fragment: str) -> None:
    answer = client.post("/v1/classify", content=body, headers={"Content-Type": content_type})
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["status"] == status and fragment.lower() in problem["detail"].lower()
    assert client.get("/healthz").status_code == 200


def test_bodies_over_the_limit_are_413_before_they_are_read(client, monkeypatch) -> None:
    import mnist_ann.serve.app as app_module

    monkeypatch.setattr(app_module, "MAX_JSON_BYTES", 1000)
    monkeypatch.setattr(app_module, "MAX_IMAGE_BYTES", 1000)
    big = json.dumps({"pixels": PIXELS}).encode()
    assert client.post("/v1/classify", content=big,
                       headers={"Content-Type": "application/json"}).status_code == 413

    def chunks():  # no Content-Length: the cap is counted as the body arrives
        for _ in range(100):
            yield b"\0" * 100

    answer = client.post("/v1/classify", content=chunks(), headers={"Content-Type": "image/png"})
    assert answer.status_code == 413 and answer.json()["title"] == "Request too large"
    assert client.get("/healthz").status_code == 200


def test_unknown_digits_and_paths(client) -> None:
    assert client.get("/v1/digits/99999999.png").status_code == 404
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert client.get("/v1/digits/abc.png").status_code == 422


def test_concurrent_requests_answer_as_serial_ones(service: ClassifyService,
                                                   queries: np.ndarray) -> None:
    bodies = [json.dumps({"pixels": q.tolist(), "index": index, "k": k}).encode()
              for q in queries for index in ("hnsw", "flat") for k in (1, 7)]
    serial = [service.classify_json(body) for body in bodies]
    for result in serial:
        result["timings"] = None
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(service.classify_json, bodies * 3))
    for result in concurrent:
        result["timings"] = None
    assert concurrent == serial * 3


def test_the_service_refuses_nothing_to_serve(collection: Collection) -> None:
    from mnist_ann.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="at least one index"):
        ClassifyService(collection, [])


def test_concurrent_requests_to_a_flat_index_are_searched_together(collection: Collection,
                                                                   queries: np.ndarray,
                                                                   monkeypatch) -> None:
    from mnist_ann.serve.service import GatheredSearch, exhaustive

    assert exhaustive(collection.indexes["flat"]) and not exhaustive(collection.indexes["hnsw"])
    service = ClassifyService(collection, ["flat", "hnsw"])
    assert set(service.gathered) == {"flat"}
    gathered = service.gathered["flat"]
    sizes: list[int] = []
    search = gathered.searcher.search

    def counted(pixels, k, params=None):
        sizes.append(len(pixels))
        time.sleep(0.05)  # a slow scan, so that requests pile up behind it
        return search(pixels, k, params)

    monkeypatch.setattr(gathered, "searcher", type("Slow", (), {"search": staticmethod(counted),
                                                                "name": "flat"})())
    bodies = [json.dumps({"pixels": q.tolist(), "index": "flat", "k": k}).encode()
              for q in queries for k in (3, 7)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(service.classify_json, bodies))
    expected = ClassifyService(collection, ["flat"], gather=False)
    for body, answer in zip(bodies, answers, strict=True):
        alone = expected.classify_json(body)
        assert [n["id"] for n in answer["neighbours"]] == [n["id"] for n in alone["neighbours"]]
        assert answer["prediction"] == alone["prediction"]
    assert sum(sizes) == len(bodies) and max(sizes) > 1  # searched together, each once
    assert isinstance(gathered, GatheredSearch)
