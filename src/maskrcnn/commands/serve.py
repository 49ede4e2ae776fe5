"""maskrcnn serve: the model behind HTTP (JSON API, overlay PNG, a web page, Prometheus metrics).

The routes are in maskrcnn/serve/app.py; this module reads the flags and runs uvicorn."""

from __future__ import annotations

from ..checks import COUNT, NON_NEGATIVE, PORT, POSITIVE
from ._options import (add_detection_options, add_device_option, add_max_pixels_option, add_precision_option,
                       add_trust_option, add_weights_option, predictor_options)

NAME = "serve"
HELP = "serve the model over HTTP: JSON API, overlay PNG, a web page and Prometheus metrics"
ORDER = 15

DEFAULT_MAX_PIXELS = 24_000_000
DEFAULT_MAX_PIXELS_HELP = (
    "24 MP (a 24 MP camera photo passes): every queued image is held decoded, 3 bytes a pixel, so the queue "
    "alone may hold --queue-size x 72 MB; raise it for larger photos")
# SIGTERM: in-flight requests get DRAIN_S to finish, then the model's work FINISH_S; gone within 10 s.
DRAIN_S, FINISH_S = 7.0, 1.5


def add_arguments(p) -> None:
    add_weights_option(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=PORT.flag, default=8000, help="TCP port (default 8000)")
    add_precision_option(p)
    add_device_option(p)
    add_detection_options(p, 0.5, "requests may ask for another with ?score_thresh=")
    add_trust_option(p)
    p.add_argument("--queue-size", type=COUNT.flag, default=16, metavar="N",
                   help="images that may wait for the model; more get 503 with Retry-After (default 16)")
    p.add_argument("--max-batch", type=COUNT.flag, default=1, metavar="N",
                   help="run up to N queued images as one batch (default 1: answers equal `maskrcnn predict`'s "
                        "exactly; batches pad images to one size, which changes results slightly)")
    p.add_argument("--batch-wait-ms", type=NON_NEGATIVE.flag, default=2.0, metavar="MS",
                   help="with --max-batch > 1, wait up to MS milliseconds for more images (default 2)")
    p.add_argument("--max-upload-mb", type=POSITIVE.flag, default=20.0, metavar="MB",
                   help="refuse request bodies over MB megabytes with 413, without reading them (default 20)")
    add_max_pixels_option(p, DEFAULT_MAX_PIXELS, DEFAULT_MAX_PIXELS_HELP)


def run(args) -> int:
    import logging

    import uvicorn

    from ..devices import resolve_device
    from ..errors import MaskRCNNError
    from ..predictor import Predictor
    from ..serve.app import ServeOptions, create_app
    from ..serve.limits import Limits

    device = resolve_device(args.device)  # a bad --device is one line before anything starts
    settings = predictor_options(args)
    limits = Limits(max_upload_bytes=round(args.max_upload_mb * 1e6), max_pixels=settings.pop("max_pixels"))
    options = ServeOptions(limits=limits, queue_size=args.queue_size, max_batch=args.max_batch,
                           batch_wait_s=args.batch_wait_ms / 1000, finish_s=FINISH_S)
    failure: list[str] = []

    def load():
        return Predictor(args.weights, device=device, max_pixels=None, **settings)

    def on_load_failure(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    app = create_app(load, options, on_load_failure)
    config = uvicorn.Config(app, host=args.host, port=args.port, lifespan="on", log_level="info",
                            timeout_graceful_shutdown=DRAIN_S)
    ours = logging.getLogger("maskrcnn.serve")  # in uvicorn's format, beside its lines
    ours.handlers[:], ours.propagate = logging.getLogger("uvicorn").handlers, False
    ours.setLevel(logging.INFO)
    server = uvicorn.Server(config)
    listener = _listen(args.host, args.port)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    ours.info("listening on http://%s:%d/ (the page; the API under /v1/, /healthz, /metrics)", shown, args.port)
    server.run(sockets=[listener])
    if failure:
        raise MaskRCNNError(failure[0])
    return 0


def _listen(host: str, port: int):
    """The listening socket, bound here so that a port in use is one line before anything starts (uvicorn
    would start the app, and with it the model's loading, before finding out)."""
    import socket

    from ..errors import MaskRCNNError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        listener = socket.socket(family, kind, proto)
    except OSError as error:
        raise MaskRCNNError(f"--host {host}: {error.strerror or error}") from None
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as error:
        listener.close()
        raise MaskRCNNError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return listener
