"""What the web service does, without the web: requests as bytes and dicts in, answers as
dicts (or PNG bytes) out, every refusal a `Problem` with its HTTP status.

One `ClassifyService` is shared by every request: it holds one loaded classifier per index
(read-only after loading), and a request changes nothing shared; FAISS parameters travel with
each search and threads are scoped to the calling thread.
"""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from mnist_ann.api import Collection
from mnist_ann.classify import Classifier
from mnist_ann.data.images import UnreadableImage, png_bytes
from mnist_ann.data.mnist import N_PIXELS, to_uint8_pixels
from mnist_ann.data.normalize import MODES, normalize
from mnist_ann.errors import DataError, InvalidArgument, MnistAnnError
from mnist_ann.index.neighbours import Neighbours
from mnist_ann.runtime import faiss_threads

# a JSON body of 1,000 images of 784 numbers is about 3 MB; an image upload, a phone photo
MAX_JSON_BYTES = 8_000_000
MAX_IMAGE_BYTES = 12_000_000
MAX_BATCH = 1000
MAX_K = 100
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}


class Problem(Exception):
    """A refused request: its HTTP status and an RFC 9457 problem document."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail

    def document(self) -> dict:
        return {"type": "about:blank", "title": self.title, "status": self.status,
                "detail": self.detail}


def unprocessable(detail: str) -> Problem:
    return Problem(422, "Unprocessable request", detail)


@dataclass(frozen=True)
class Request:
    """One classification asked for: images [n, 784] uint8 and how to search."""

    pixels: np.ndarray
    index: str
    k: int
    params: dict
    checked: dict  # params with the index's defaults, as checked against it


def exhaustive(entry: dict) -> bool:
    """An index that compares every query with every training row (no IVF lists, no graph):
    many queries at once cost it little more than one, one pass over the rows in BLAS."""
    from mnist_ann.index.layers import is_exhaustive, make_factory_index

    return is_exhaustive(make_factory_index(N_PIXELS, entry["factory"]))


class GatheredSearch:
    """Concurrent searches of one index gathered into one FAISS call: each worker thread
    takes every request waiting when it is free (no timer: a lone request goes at once) and
    searches them together, grouped by k and parameters. One worker per core, so that
    gathering never leaves a core idle."""

    def __init__(self, searcher, threads: int, max_batch: int = 4096,
                 workers: int | None = None) -> None:
        from mnist_ann.runtime import default_threads

        self.searcher, self.threads, self.max_batch = searcher, threads, max_batch
        self._waiting: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = [threading.Thread(target=self._serve, daemon=True,
                                          name=f"gather-{searcher.name}-{i}")
                         for i in range(workers or max(1, default_threads() // threads))]
        for worker in self._workers:
            worker.start()

    def search(self, pixels: np.ndarray, k: int, params: dict) -> Neighbours:
        done: Future = Future()
        self._waiting.put((pixels, k, params, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            batch = [self._waiting.get()]
            size = len(batch[0][0])
            while size < self.max_batch:
                try:
                    batch.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
                size += len(batch[-1][0])
            groups: dict[str, list] = {}
            for item in batch:
                groups.setdefault(json.dumps([item[1], item[2]], sort_keys=True), []).append(item)
            for items in groups.values():
                self._search_together(items)

    def _search_together(self, items: list) -> None:
        try:
            with faiss_threads(self.threads):
                found = self.searcher.search(np.concatenate([item[0] for item in items]),
                                             items[0][1], items[0][2])
        except BaseException as exc:  # every waiting request learns of it
            for item in items:
                item[3].set_exception(exc)
            return
        start = 0
        for pixels, _, _, done in items:
            end = start + len(pixels)
            done.set_result(found.take(slice(start, end)))
            start = end


class ClassifyService:
    """Classification over a collection's indexes, loaded once, shared by all requests.

    `gather`: gather concurrent requests into one search for the exhaustive indexes (a flat
    scan costs about the same for one query as for a few dozen); the others search each
    request as it comes.
    """

    def __init__(self, collection: Collection, index_names: Iterable[str],
                 threads: int = 1, gather: bool = True) -> None:
        names = list(dict.fromkeys(index_names))
        if not names:
            raise InvalidArgument("serve at least one index")
        self.collection = collection
        self.threads = threads
        self.classifiers: dict[str, Classifier] = {
            name: collection.classifier(name, threads=threads) for name in names}
        self.gathered = {name: GatheredSearch(self.classifiers[name].searcher, threads)
                         for name in names if gather and exhaustive(collection.indexes[name])}
        self.default_index = names[0]
        self._digits = DigitTable(collection)

    # --- the endpoints ----------------------------------------------------------------------

    def indexes(self) -> dict:
        return {"collection": self.collection.name, "default": self.default_index,
                "indexes": [self.describe(name) for name in self.classifiers]}

    def describe(self, name: str) -> dict:
        entry = self.collection.indexes[name]
        classifier = self.classifiers[name]
        return {"name": name, "recipe": entry.get("recipe"), "factory": entry.get("factory"),
                "space": classifier.space, "ntotal": classifier.searcher.ntotal,
                "k": classifier.k, "params": dict(classifier.effective_params),
                "parameters": sorted(classifier.searcher.parameters({}))}

    def classify_json(self, body: bytes) -> dict:
        """A JSON request: {"pixels": ...} for one image, {"instances": [...]} for a batch."""
        if len(body) > MAX_JSON_BYTES:
            raise too_large(MAX_JSON_BYTES)
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise Problem(400, "Malformed JSON", f"the body is not JSON ({exc})") from None
        if not isinstance(document, dict):
            raise unprocessable("the body must be a JSON object with 'pixels' or 'instances'")
        options = {key: document.get(key) for key in ("index", "k", "params")}
        if "instances" in document:
            instances = document["instances"]
            if not isinstance(instances, list) or not 1 <= len(instances) <= MAX_BATCH:
                raise unprocessable(f"'instances' must be a list of 1 to {MAX_BATCH} images")
            pixels = np.stack([as_pixels(item.get("pixels") if isinstance(item, dict)
                                         else item, f"instances[{i}]")
                               for i, item in enumerate(instances)])
            results = self.classify(self.request(pixels, **options))
            return {"results": results}
        if "pixels" not in document:
            raise unprocessable("the body needs 'pixels' (one image) or 'instances' (a batch)")
        return self.classify(self.request(as_pixels(document["pixels"], "pixels")[None],
                                          **options))[0]

    def classify_image(self, data: bytes, content_type: str, index: str | None = None,
                       k: object = None, params: Mapping | None = None,
                       mode: str = "auto") -> dict:
        """An uploaded image file: normalised MNIST-style, then classified."""
        if len(data) > MAX_IMAGE_BYTES:
            raise too_large(MAX_IMAGE_BYTES)
        kind = content_type.split(";")[0].strip().lower()
        if kind not in IMAGE_TYPES:
            raise Problem(415, "Unsupported media type",
                          f"{kind or 'no content type'} is not one of "
                          f"{', '.join(IMAGE_TYPES)} or application/json")
        if mode not in MODES:
            raise unprocessable(f"normalize must be one of {', '.join(MODES)}, not {mode!r}")
        started = time.perf_counter()
        try:
            result = normalize(data, mode, "the upload", (IMAGE_TYPES[kind],))
        except UnreadableImage as exc:
            raise Problem(415, "Not an image", str(exc)) from None
        except DataError as exc:
            raise unprocessable(str(exc)) from None
        normalize_ms = (time.perf_counter() - started) * 1000
        request = self.request(result.pixels.reshape(1, N_PIXELS), index, k, params)
        answer = self.classify(request)[0]
        answer["normalized"] = {
            "pixels": result.pixels.tolist(), **result.record,
            "png": "data:image/png;base64," + base64.b64encode(
                png_bytes(result.pixels)).decode()}
        answer["timings"]["normalize_ms"] = round(normalize_ms, 3)
        return answer

    def digit_png(self, digit_id: int) -> bytes:
        return png_bytes(self._digits.pixels(digit_id))

    # --- the work ---------------------------------------------------------------------------

    def request(self, pixels: np.ndarray, index: object = None, k: object = None,
                params: object = None) -> Request:
        index = self.default_index if index is None else index
        if not isinstance(index, str) or index not in self.classifiers:
            raise Problem(404, "Unknown index", f"index {index!r} is not served; served: "
                                                f"{', '.join(self.classifiers)}")
        k = self.classifiers[index].k if k is None else k  # the index's own, as `query`
        if isinstance(k, str) and k.isdigit():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise unprocessable(f"k must be a whole number from 1 to {MAX_K}, not {k!r}")
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise unprocessable("params must be an object such as {\"efSearch\": 64}")
        try:
            checked = self.classifiers[index].searcher.parameters(params)
        except MnistAnnError as exc:
            raise unprocessable(str(exc)) from None
        return Request(pixels, index, k, dict(params), checked)

    def classify(self, request: Request) -> list[dict]:
        classifier = self.classifiers[request.index]
        started = time.perf_counter()
        if request.index in self.gathered:
            found = self.gathered[request.index].search(request.pixels, request.k,
                                                        request.params)
        else:
            with faiss_threads(self.threads):
                found = classifier.searcher.search(request.pixels, request.k, request.params)
        scores = classifier.scores_of(found)
        search_ms = (time.perf_counter() - started) * 1000
        confidences = classifier.confidences(found, scores)
        winners = np.argmax(scores, axis=1)
        labels = self._digits.train_labels
        ids = self._digits.train_ids
        distances = found.distances.tolist()  # Python ints in integer spaces, floats otherwise
        results = []
        for i, winner in enumerate(winners):
            rows = found.rows[i]
            neighbours = [{"id": int(ids[row]), "label": int(labels[row]),
                           "distance": distances[i][j],
                           "image": f"/v1/digits/{int(ids[row])}.png"}
                          for j, row in enumerate(rows) if row >= 0]
            results.append({
                "prediction": int(classifier.classes[winner]),
                "confidence": round(float(confidences[i]), 6),
                "votes": {str(int(label)): round(float(score), 6)
                          for label, score in zip(classifier.classes, scores[i], strict=True)
                          if score > 0},
                "neighbours": neighbours, "index": request.index, "k": request.k,
                "params": request.checked, "timings": {"search_ms": round(search_ms, 3),
                                              "batch": len(winners)}})
        return results


class DigitTable:
    """MNIST-70k ids of the collection's training and test rows, to their pixels."""

    def __init__(self, collection: Collection) -> None:
        train, test = collection.train(), collection.test()
        self.train_ids, self.train_labels = train.ids, train.labels
        ids = np.concatenate([train.ids, test.ids])
        self._order = np.argsort(ids, kind="stable")
        self._sorted = ids[self._order]
        self._tables = (train.pixels, test.pixels)
        self._n_train = len(train.ids)

    def pixels(self, digit_id: int) -> np.ndarray:
        at = int(np.searchsorted(self._sorted, digit_id))
        if at >= len(self._sorted) or self._sorted[at] != digit_id:
            raise Problem(404, "Unknown digit", f"no digit {digit_id} in this collection")
        row = int(self._order[at])
        if row < self._n_train:
            return self._tables[0][row]
        return self._tables[1][row - self._n_train]


def as_pixels(value: object, what: str) -> np.ndarray:
    """784 whole numbers 0..255, flat or as 28 rows of 28, as uint8."""
    if not isinstance(value, list):
        raise unprocessable(f"{what} must be a list of {N_PIXELS} numbers or 28 lists of 28")
    try:
        array = np.array(value)
    except (ValueError, TypeError):  # ragged rows
        raise unprocessable(f"{what}: 28 rows of 28 pixels expected") from None
    if array.shape == (28, 28):
        array = array.reshape(N_PIXELS)
    if array.ndim == 2:
        raise unprocessable(f"{what}: 28 rows of 28 pixels expected, not {array.shape[0]} of "
                            f"{array.shape[1]}")
    if array.shape != (N_PIXELS,):
        raise unprocessable(f"{what} has {array.size} values; expected {N_PIXELS} (28x28)")
    if array.dtype.kind not in "iuf":  # strings, booleans, nulls and objects are not pixels
        raise unprocessable(f"{what}: every pixel must be a number 0..255")
    try:
        return to_uint8_pixels(array, what)
    except DataError as exc:
        raise unprocessable(str(exc)) from None


def too_large(limit: int) -> Problem:
    return Problem(413, "Request too large", f"the body is over {limit:,} bytes; send smaller "
                                             "images or fewer at once")


