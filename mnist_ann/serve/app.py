"""The HTTP layer over `ClassifyService`: FastAPI routes, bodies read with a size cap (Starlette
has none), every refusal an `application/problem+json` answer, and pages that need nothing
from the internet (the drawing page and the API docs are served from the package)."""

from __future__ import annotations

import html
import json
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mnist_ann import __version__
from mnist_ann.serve.service import (
    MAX_IMAGE_BYTES,
    MAX_JSON_BYTES,
    ClassifyService,
    Problem,
    too_large,
)

PROBLEM = "application/problem+json"


def problem_response(problem: Problem) -> JSONResponse:
    return JSONResponse(problem.document(), status_code=problem.status, media_type=PROBLEM)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (whatever Content-Length says)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def uploaded_image(request: Request, body: bytes, content_type: str) -> tuple[bytes, str]:
    """The image of a multipart form's `image` field, or the raw body."""
    if not content_type.startswith("multipart/form-data"):
        return body, content_type
    from starlette.datastructures import UploadFile

    request._body = body  # Starlette parses the form from the body already read (and capped)
    try:
        form = await request.form(max_files=1, max_fields=8)
    except Exception as exc:  # python-multipart's errors carry no common base
        raise Problem(400, "Malformed form", f"the multipart body cannot be read ({exc})") \
            from None
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise Problem(422, "Unprocessable request", "the form needs a file field 'image'")
    return await upload.read(), upload.content_type or ""


def create_app(service: ClassifyService) -> FastAPI:
    """The web application over one shared service."""
    app = FastAPI(title="mnist-ann", version=__version__, docs_url=None, redoc_url=None,
                  description="k-NN digit recognition over FAISS indexes: classify MNIST-style "
                              "pixels or any photo or drawing of a digit.")

    @app.exception_handler(Problem)
    async def on_problem(request: Request, problem: Problem) -> JSONResponse:
        return problem_response(problem)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return problem_response(Problem(error.status_code, str(error.detail), str(error.detail)))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        return problem_response(Problem(500, "Internal error",
                                        f"{type(error).__name__}: {error}"))

    @app.post("/v1/classify", summary="Classify one image, a batch, or an uploaded image file",
              description="JSON `{\"pixels\": [784 ints] or 28x28, \"index\", \"k\", "
                          "\"params\"}` for one image, `{\"instances\": [...]}` for a batch "
                          "(answered as `{\"results\": [...]}`); or a PNG/JPEG/WEBP body "
                          "(raw, or multipart field `image`) with `?index=&k=&normalize=` in "
                          "the query string, normalised MNIST-style first.")
    async def classify(request: Request) -> Response:
        content_type = request.headers.get("content-type", "").lower()
        if content_type.startswith("application/json"):
            body = await read_body(request, MAX_JSON_BYTES)
            return JSONResponse(await run(service.classify_json, body))
        body = await read_body(request, MAX_IMAGE_BYTES)
        data, kind = await uploaded_image(request, body, content_type)
        query = request.query_params
        params = {key[len("param."):]: value for key, value in query.items()
                  if key.startswith("param.")}
        return JSONResponse(await run(
            service.classify_image, data, kind, query.get("index"), query.get("k"),
            {key: numeric(value) for key, value in params.items()},
            query.get("normalize", "auto")))

    @app.get("/v1/indexes", summary="The indexes served, their spaces and search parameters")
    def indexes() -> dict:
        return service.indexes()

    @app.get("/v1/digits/{digit_id}.png", summary="A training or test digit as a 28x28 PNG",
             response_class=Response)
    def digit(digit_id: int) -> Response:
        return Response(service.digit_png(digit_id), media_type="image/png",
                        headers={"Cache-Control": "public, max-age=31536000, immutable"})

    @app.get("/healthz", summary="Alive, with what is loaded")
    def healthz() -> dict:
        return {"status": "ok", "collection": service.collection.name,
                "indexes": list(service.classifiers)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(files("mnist_ann.serve").joinpath("page.html").read_text())

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(docs_page(app.openapi()))

    return app


async def run(function, *args):
    """A blocking call (search, decoding) in the thread pool, so the event loop keeps serving."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args)


def numeric(value: str) -> object:
    try:
        return json.loads(value)
    except ValueError:
        return value


def docs_page(schema: dict) -> str:
    """The API described from its OpenAPI schema on one self-contained page."""
    rows = []
    for path, methods in schema.get("paths", {}).items():
        for method, operation in methods.items():
            rows.append(f"<h2><code>{method.upper()} {html.escape(path)}</code></h2>"
                        f"<p><b>{html.escape(operation.get('summary', ''))}</b></p>"
                        f"<p>{html.escape(operation.get('description', ''))}</p>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>mnist-ann API</title>"
            "<style>body{font-family:sans-serif;max-width:50rem;margin:2rem auto;"
            "line-height:1.4}code{background:#eee;padding:0 .3em}</style></head><body>"
            f"<h1>{html.escape(schema['info']['title'])} {html.escape(schema['info']['version'])}"
            f"</h1><p>{html.escape(schema['info'].get('description', ''))}</p>"
            "<p>Errors are <code>application/problem+json</code>: 400 malformed, 404 unknown "
            "index or digit, 413 too large, 415 not an image, 422 wrong shape, values or "
            "parameters. The machine-readable schema: <a href='/openapi.json'>/openapi.json"
            "</a>.</p>" + "".join(rows) + "</body></html>")
