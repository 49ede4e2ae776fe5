"""The HTTP routes of `maskrcnn serve` (Starlette; uvicorn runs it, see commands/serve.py).

Every answer is JSON (but the overlay PNG, the page and /metrics); every refusal is `{"error": "<one line>"}`
with its status code: 400 empty or malformed body, 404/405 unknown route or method, 413 upload or image too
large, 415 a body that is neither multipart nor an image, 422 a bad option or a file that is not a readable
image, 503 while the model loads or when the queue is full (with Retry-After), 500 a bug (logged).
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..checks import COUNT, PROBABILITY
from ..errors import MaskRCNNError
from .batcher import Batcher, QueueFull
from .formats import MASK_FORMATS, instances_json
from .limits import HTTPProblem, Limits, UploadFolder, decode_upload
from .metrics import ServerMetrics
from .service import ModelService

log = logging.getLogger("maskrcnn.serve")
STATIC = Path(__file__).parent / "static"
QUERY_OPTIONS = {"score_thresh": PROBABILITY, "max_detections": COUNT}
RAW_TYPES = ("image/", "application/octet-stream")


@dataclass(frozen=True)
class ServeOptions:
    limits: Limits
    queue_size: int = 16
    max_batch: int = 1
    batch_wait_s: float = 0.0
    # At shutdown, after uvicorn has let the in-flight requests finish: how long the model's loading or its
    # current batch may still take before the process ends.
    finish_s: float = 1.5


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    line = " ".join(str(message).split()) or "error"
    return JSONResponse({"error": line}, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------- requests

def parse_query(request: Request) -> tuple[tuple, str]:
    """((score_thresh, max_detections), mask_format) from the query; None keeps the server's default."""
    values = {}
    for name in request.query_params:
        if name not in (*QUERY_OPTIONS, "mask_format"):
            raise HTTPProblem(422, f"unknown query option {name!r}; the options are score_thresh, "
                                   "max_detections and mask_format")
    for name, rule in QUERY_OPTIONS.items():
        text = request.query_params.get(name)
        try:
            values[name] = None if text is None else rule.parse(text)
        except ValueError as error:
            raise HTTPProblem(422, f"{name} {error}") from None
    mask_format = request.query_params.get("mask_format", "rle")
    if mask_format not in MASK_FORMATS:
        raise HTTPProblem(422, f"mask_format must be one of {', '.join(MASK_FORMATS)}, got {mask_format!r}")
    return (values["score_thresh"], values["max_detections"]), mask_format


async def receive_upload(request: Request, limits: Limits, folder: UploadFolder) -> tuple[Path, str]:
    """The image's bytes, written to a new file of `folder` within the size limit -> (file, name shown in
    errors). The caller removes the file."""
    limits.check_declared_length(request.headers)
    content_type = request.headers.get("content-type", "")
    limited = Request(request.scope, limits.limit_receive(request.receive))
    path = folder.new_file()
    try:
        if content_type.startswith("multipart/form-data"):
            async with limited.form(max_files=1, max_fields=16) as form:
                upload = form.get("image")
                if upload is None or isinstance(upload, str):
                    raise HTTPProblem(422, "the multipart body has no file field named 'image'")
                with open(path, "wb") as out:
                    await run_in_threadpool(_copy, upload.file, out)
                return path, Path(upload.filename or "upload").name
        if not content_type.startswith(RAW_TYPES):
            raise HTTPProblem(415, f"Content-Type {content_type or '(none)'!r}: send the image as the multipart "
                                   "field 'image' or as a raw image/* body")
        with open(path, "wb") as out:
            async for chunk in limited.stream():
                out.write(chunk)
        return path, "upload"
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _copy(source, target) -> None:
    while block := source.read(1 << 20):
        target.write(block)


# ---------------------------------------------------------------------------------------------- the app

def create_app(load: Callable[[], object], options: ServeOptions,
               on_load_failure: Callable[[str], None] | None = None):
    """The ASGI app. `load()` returns the server's base `Predictor`; it runs in a background thread at
    startup, and `on_load_failure(line)` is called if it fails."""
    server = _Server(load, options, on_load_failure)
    routes = [Route("/", server.index), Route("/healthz", server.healthz), Route("/v1/model", server.model_info),
              Route("/v1/predict", server.predict, methods=["POST"]),
              Route("/v1/predict/overlay", server.overlay, methods=["POST"]),
              Route("/metrics", server.metrics_page), Mount("/static", StaticFiles(directory=STATIC), name="static")]
    handlers = {HTTPProblem: _problem, HTTPException: _http_exception, Exception: _unexpected}
    app = Starlette(routes=routes, lifespan=server.lifespan, exception_handlers=handlers)
    app.state.service, app.state.batcher = server.service, server.batcher
    return MetricsMiddleware(app, server.metrics)


class _Server:
    """The parts of one server and its route handlers."""

    def __init__(self, load, options: ServeOptions, on_load_failure):
        self.options = options
        self.service = ModelService(load)
        self.batcher = Batcher(self.service.run_batch, options.queue_size, options.max_batch, options.batch_wait_s,
                               on_batch=self._observe_batch)
        self.metrics = ServerMetrics(lambda: self.batcher.depth, options.queue_size,
                                     lambda: self.batcher.running)
        self.folder: UploadFolder | None = None
        self._on_load_failure = on_load_failure

    def _observe_batch(self, images: int, seconds: float) -> None:
        self.metrics.observe_batch(images, seconds)

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.folder = UploadFolder()
        self.batcher.start()
        self.service.load_in_background(self._on_load_failure)
        yield
        self.service.wait_for_loading(self.options.finish_s)
        self.batcher.stop(self.options.finish_s)
        self.folder.remove()

    async def run_model(self, request: Request):
        """Shared by /v1/predict and /v1/predict/overlay: (image, detections, timings, mask_format)."""
        started = time.perf_counter()
        self.service.check_ready()
        key, mask_format = parse_query(request)
        path, shown = await receive_upload(request, self.options.limits, self.folder)
        try:
            image = await run_in_threadpool(decode_upload, path, shown, self.options.limits)
        finally:
            path.unlink(missing_ok=True)
        decoded = time.perf_counter()
        try:
            job = self.batcher.submit(image, key)
        except QueueFull:
            raise HTTPProblem(503, f"busy: the queue holds its limit of {self.options.queue_size} images; try again",
                              {"Retry-After": str(self.batcher.retry_after_s())}) from None
        try:
            detections = await job.future
        except MaskRCNNError as error:
            raise HTTPProblem(422, str(error)) from None
        timings = {"decode": decoded - started, "queue": job.started - job.enqueued,
                   "inference": job.finished - job.started}
        return image, detections, timings, mask_format

    async def predict(self, request: Request):
        started = time.perf_counter()
        image, detections, timings, mask_format = await self.run_model(request)
        encode = time.perf_counter()
        instances = await run_in_threadpool(instances_json, detections, mask_format)
        timings["encode"] = time.perf_counter() - encode
        timings["total"] = time.perf_counter() - started
        height, width = image.shape[:2]
        return JSONResponse({"width": width, "height": height, "instances": instances,
                             "timing_ms": {k: round(v * 1000, 2) for k, v in timings.items()}})

    async def overlay(self, request: Request):
        image, detections, _, _ = await self.run_model(request)
        return Response(await run_in_threadpool(_overlay_png, detections, image), media_type="image/png")

    async def healthz(self, request: Request):
        self.service.check_ready()
        return JSONResponse({"status": "ok"})

    async def model_info(self, request: Request):
        self.service.check_ready()
        options = self.options
        batching = {"max_batch": options.max_batch, "batch_wait_ms": options.batch_wait_s * 1000,
                    "queue_size": options.queue_size}
        return JSONResponse(self.service.describe(options.limits.describe(), batching))

    async def metrics_page(self, request: Request):
        return Response(self.metrics.exposition(), media_type=self.metrics.content_type)

    async def index(self, request: Request):
        return FileResponse(STATIC / "index.html")


def _overlay_png(detections, image) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(detections.draw(image)).save(buffer, format="PNG")
    return buffer.getvalue()


async def _problem(request: Request, error: HTTPProblem):
    return error_response(error.status, error.message, error.headers)


async def _http_exception(request: Request, error: HTTPException):
    return error_response(error.status_code, error.detail, getattr(error, "headers", None))


async def _unexpected(request: Request, error: Exception):
    from ..predictor import is_out_of_memory

    if is_out_of_memory(error):
        return error_response(503, f"not enough memory for this image ({type(error).__name__})")
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=error)
    return error_response(500, f"internal error: {type(error).__name__}: {error}")


class MetricsMiddleware:
    """Counts every HTTP answer by path and status, and its latency (pure ASGI: bodies stream through)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.observe_request(scope["path"], status, time.perf_counter() - started)
