"""`maskrcnn serve`: the model behind HTTP. app.py the routes, batcher.py the bounded queue and the worker,
service.py the model and its per-request settings, limits.py upload limits and decoding, formats.py the
answer's JSON, metrics.py Prometheus, static/ the web page (plain HTML/CSS/JS, no network needed)."""

from .app import ServeOptions, create_app
from .limits import Limits

__all__ = ["ServeOptions", "create_app", "Limits"]
