"""The bounded queue in front of the model, and the one thread that runs it.

Requests put a `Job` (a decoded image and the settings it asks for) in a queue of at most `queue_size`;
a full queue refuses at once (`QueueFull`, the server's 503 with Retry-After) rather than letting waits
and memory grow. One worker thread takes jobs in arrival order: the first, plus those that arrive within
`batch_wait_s` up to `max_batch`, and runs the jobs that share their settings as one batch. Each job's
result goes back to its own future, so no answer can carry another request's detections. A batch pads its
images to one size, so with `max_batch` > 1 results can differ slightly from one-at-a-time ones (as with
`maskrcnn predict --batch-size`); 1, the default, gives exactly `predict`'s answers.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np


class QueueFull(Exception):
    """The queue holds `queue_size` jobs already."""


@dataclass
class Job:
    image: np.ndarray
    key: Hashable                      # the settings; only jobs with equal keys share a batch
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    finished: float = 0.0
    batch_size: int = 0


class Batcher:
    """`run_batch(images, key) -> results` is called from the worker thread only, one batch at a time."""

    def __init__(self, run_batch: Callable, queue_size: int, max_batch: int = 1, batch_wait_s: float = 0.0,
                 on_batch: Callable[[int, float], None] | None = None):
        self._run_batch = run_batch
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self._on_batch = on_batch
        self._running = 0  # jobs taken from the queue and not answered yet
        self._seconds_per_image = 0.0  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._work, name="maskrcnn-batcher", daemon=True)

    # ------------------------------------------------------------------------------------------ callers

    def start(self) -> None:
        self._thread.start()

    def submit(self, image: np.ndarray, key: Hashable) -> Job:
        """Queue one image (call from the event loop); `await job.future` gives its result or raises its
        error. Raises QueueFull when the queue is full."""
        loop = asyncio.get_running_loop()
        job = Job(image, key, loop.create_future(), loop)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job

    @property
    def depth(self) -> int:
        """Jobs waiting plus jobs being run."""
        return self._queue.qsize() + self._running

    @property
    def running(self) -> int:
        """Jobs taken from the queue and not answered yet."""
        return self._running

    def retry_after_s(self) -> int:
        """A guess at when the queue will have room: its depth times the recent time per image."""
        return max(1, round(self.depth * self._seconds_per_image + 0.5))

    def stop(self, timeout: float) -> None:
        """End the worker once its current batch is done (waits at most `timeout` seconds). Jobs still queued
        are cancelled: the server stops only after its requests have been answered or given up."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.loop.call_soon_threadsafe(job.future.cancel)
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------ worker

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            self._running += 1
            jobs, stop = self._gather(first)
            groups: dict = {}
            for job in jobs:
                groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                self._run(group)
            if stop:
                return

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """`first` and the jobs that come within the batch wait, up to max_batch; True when the stop
        sentinel was among them."""
        jobs = [first]
        deadline = time.perf_counter() + self.batch_wait_s
        while len(jobs) < self.max_batch:
            try:
                remaining = deadline - time.perf_counter()
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            self._running += 1
            jobs.append(job)
        return jobs, False

    def _run(self, jobs: list[Job]) -> None:
        started = time.perf_counter()
        for job in jobs:
            job.started, job.batch_size = started, len(jobs)
        try:
            results = self._run_batch([job.image for job in jobs], jobs[0].key)
            # A result may be an exception of its own: one image failed, the others of its batch did not.
            outcomes = [(None, r) if isinstance(r, Exception) else (r, None) for r in results]
        except Exception as error:  # the request's answer (one line); the worker keeps serving
            outcomes = [(None, error)] * len(jobs)
        finished = time.perf_counter()
        seconds = (finished - started) / len(jobs)
        self._seconds_per_image = seconds if not self._seconds_per_image else \
            0.8 * self._seconds_per_image + 0.2 * seconds
        if self._on_batch is not None:
            self._on_batch(len(jobs), finished - started)
        for job, (result, error) in zip(jobs, outcomes):
            job.finished = finished
            self._running -= 1
            job.loop.call_soon_threadsafe(_settle, job.future, result, error)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.cancelled():  # the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
