"""Prometheus metrics of one server (its own registry, so two servers in one process never mix counts)."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Paths counted under their own name; anything else (typos, scanners) is counted as "other", so that the
# number of label values stays bounded.
KNOWN_PATHS = ("/", "/healthz", "/v1/model", "/v1/predict", "/v1/predict/overlay", "/metrics")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW_S = 60.0


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth, queue_size: int, running):
        self.registry = CollectorRegistry()
        self.requests = Counter("maskrcnn_requests", "HTTP requests answered, by path and status code",
                                ["path", "status"], registry=self.registry)
        self.latency = Histogram("maskrcnn_request_seconds", "time from request to answer, by path", ["path"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images = Counter("maskrcnn_images", "images run through the model", registry=self.registry)
        self.batch_size = Histogram("maskrcnn_batch_size", "images per model call",
                                    buckets=(1, 2, 4, 8, 16, 32), registry=self.registry)
        depth = Gauge("maskrcnn_queue_depth", "images waiting or being run", registry=self.registry)
        depth.set_function(queue_depth)
        busy = Gauge("maskrcnn_images_running", "images the model is running now (the rest of the depth waits)",
                     registry=self.registry)
        busy.set_function(running)
        limit = Gauge("maskrcnn_queue_limit", "the most images the queue holds (--queue-size)",
                      registry=self.registry)
        limit.set(queue_size)
        rate = Gauge("maskrcnn_images_per_second", f"images run per second over the last {RATE_WINDOW_S:g} s",
                     registry=self.registry)
        rate.set_function(self.images_per_second)
        self._recent: collections.deque = collections.deque()  # (time, images) of recent batches
        self._lock = threading.Lock()

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        path = path if path in KNOWN_PATHS else "other"
        self.requests.labels(path=path, status=str(status)).inc()
        self.latency.labels(path=path).observe(seconds)

    def observe_batch(self, images: int, seconds: float) -> None:
        """Called by the batcher's worker after each model call."""
        self.images.inc(images)
        self.batch_size.observe(images)
        with self._lock:
            self._recent.append((time.monotonic(), images))

    def images_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
