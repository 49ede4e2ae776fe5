"""The batcher alone, with a stand-in model: batches of at most max_batch jobs of equal settings, each
job's own result (or error) back to its own request, a full queue refused at once."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from maskrcnn.serve.batcher import Batcher, QueueFull


class StandIn:
    """Answers each image with (its id, the settings key, the batch's size); waits for `gate` first so that
    the test decides when the worker may go on."""

    def __init__(self):
        self.gate = threading.Event()
        self.batches: list[tuple[list[int], object]] = []

    def __call__(self, images, key):
        self.gate.wait(10)
        ids = [int(image[0, 0]) for image in images]
        self.batches.append((ids, key))
        return [ValueError(f"image {i} is bad") if i == 13 else (i, key, len(images)) for i in ids]


def image(i: int) -> np.ndarray:
    return np.full((2, 2), i)


def test_batches_group_equal_settings_and_answer_each_job_with_its_own_result():
    model = StandIn()
    batcher = Batcher(model, queue_size=32, max_batch=3, batch_wait_s=0.5)
    batcher.start()

    async def scenario():
        jobs = [batcher.submit(image(0), "a")]
        await asyncio.sleep(0.1)  # the worker holds job 0 and waits for more
        keys = ["a", "b", "a", "a", "b"]
        jobs += [batcher.submit(image(i + 1), key) for i, key in enumerate(keys)]
        jobs.append(batcher.submit(image(13), "a"))
        model.gate.set()
        return await asyncio.gather(*(job.future for job in jobs), return_exceptions=True)

    results = asyncio.run(scenario())
    batcher.stop(5)
    # First gathering: jobs 0, 1 ("a") and 2 ("b") -> two batches by settings; then 3, 4 ("a") and 5 ("b");
    # then 13 alone.
    assert model.batches == [([0, 1], "a"), ([2], "b"), ([3, 4], "a"), ([5], "b"), ([13], "a")]
    assert results[:6] == [(0, "a", 2), (1, "a", 2), (2, "b", 1), (3, "a", 2), (4, "a", 2), (5, "b", 1)]
    assert isinstance(results[6], ValueError) and str(results[6]) == "image 13 is bad"


def test_a_full_queue_refuses_at_once():
    model = StandIn()
    batcher = Batcher(model, queue_size=2, max_batch=1)
    batcher.start()

    async def scenario():
        running = batcher.submit(image(1), None)
        await asyncio.sleep(0.1)  # taken by the worker, which waits at the gate
        queued = [batcher.submit(image(2), None), batcher.submit(image(3), None)]
        assert batcher.depth == 3
        with pytest.raises(QueueFull):
            batcher.submit(image(4), None)
        model.gate.set()
        return await asyncio.gather(running.future, *(job.future for job in queued))

    assert asyncio.run(scenario()) == [(1, None, 1), (2, None, 1), (3, None, 1)]
    batcher.stop(5)
    assert batcher.depth == 0 and not batcher._thread.is_alive()


def test_stop_lets_the_running_batch_finish_and_cancels_the_queued_jobs():
    model = StandIn()
    batcher = Batcher(model, queue_size=4, max_batch=1)
    batcher.start()

    async def scenario():
        running = batcher.submit(image(1), None)
        await asyncio.sleep(0.1)
        queued = batcher.submit(image(2), None)
        await asyncio.to_thread(batcher.stop, 0.1)  # returns while the running batch waits at the gate
        model.gate.set()
        return await running.future, await asyncio.gather(queued.future, return_exceptions=True)

    result, (queued,) = asyncio.run(scenario())
    assert result == (1, None, 1) and isinstance(queued, asyncio.CancelledError)
    batcher._thread.join(5)
    assert not batcher._thread.is_alive() and model.batches == [([1], None)]
