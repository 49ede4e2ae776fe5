"""The bounded queue: a full queue answers 503 with Retry-After (never a crash, never a mixed answer); SIGTERM
lets in-flight requests finish and ends the process within 10 s; /healthz is 503 until the model is loaded."""

from __future__ import annotations

import signal
import threading
import time
import warnings

import httpx
import pytest

from maskrcnn.serve import Limits, ServeOptions, create_app
from serving import ServerProcess, post_image, save_tiny_checkpoint, without_timing

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    # Larger inputs than the API tests' model: a few tenths of a second per image, so that a burst of
    # uploads finds the one-place queue full.
    return save_tiny_checkpoint(tmp_path_factory.mktemp("weights"), min_size=512, max_size=640)


def burst(url, paths) -> list[httpx.Response]:
    answers: list = [None] * len(paths)
    barrier = threading.Barrier(len(paths))

    def upload(i):
        barrier.wait()
        answers[i] = post_image(url, paths[i])

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(paths))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


@pytest.fixture(scope="module")
def server(weights, tmp_path_factory):
    """One server for the module, with a queue of one place; the last test ends it with SIGTERM."""
    process = ServerProcess(weights, "--queue-size", 1, log=tmp_path_factory.mktemp("server") / "server.log")
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def sequential(server, val_images):
    return {path: without_timing(post_image(server.url, path).json()) for path in val_images[:3]}


def test_full_queue_is_503_with_retry_after(server, sequential):
    paths = list(sequential)
    order = [paths[i % 3] for i in range(12)]
    answers = burst(server.url, order)
    statuses = [a.status_code for a in answers]
    assert set(statuses) == {200, 503}, statuses
    for path, answer in zip(order, answers):
        if answer.status_code == 200:
            assert without_timing(answer.json()) == sequential[path]
        else:
            assert int(answer.headers["Retry-After"]) >= 1
            assert answer.json() == {"error": "busy: the queue holds its limit of 1 images; try again"}
    assert post_image(server.url, paths[0]).status_code == 200  # and it goes on serving
    assert "Traceback" not in server.log()


def _gauge(server, name) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


def _wait_for(condition, seconds=30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def _one_running_one_waiting(server, paths) -> tuple[list, list] | None:
    """Uploads paths[0], and paths[1] once the model runs the first: returns the answers list the upload
    threads fill and the threads, once the server holds one image running and one waiting (None if the first was answered
    before the second was queued)."""
    answers: list = [None, None]

    def upload(i):
        answers[i] = post_image(server.url, paths[i])

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(2)]
    threads[0].start()
    assert _wait_for(lambda: _gauge(server, "maskrcnn_images_running") == 1 or answers[0] is not None)
    threads[1].start()
    assert _wait_for(lambda: _gauge(server, "maskrcnn_queue_depth") == 2 or answers[0] is not None)
    if answers[0] is not None:
        for thread in threads:
            thread.join()
        return None
    return answers, threads


def test_sigterm_drains_in_flight_requests(server, sequential):
    paths = list(sequential)[:2]  # one for the model, one for the queue's place
    for _ in range(5):  # a first image answered before the second is queued leaves nothing to drain: again
        in_flight = _one_running_one_waiting(server, paths)
        if in_flight is not None:
            break
    assert in_flight is not None, "the model answered each first image before a second one could be queued"
    answers, threads = in_flight
    sent = time.monotonic()
    server.terminate()
    for thread in threads:
        thread.join()
    server.process.wait(timeout=10)
    assert time.monotonic() - sent < 10
    # uvicorn ends by raising the signal again once shut down: killed by SIGTERM, after a clean shutdown.
    assert server.process.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log()
    assert [a.status_code for a in answers] == [200] * len(paths), [a.text for a in answers]
    assert [without_timing(a.json()) for a in answers] == [sequential[p] for p in paths]
    with pytest.raises(httpx.TransportError):  # gone
        httpx.get(server.url + "/healthz", timeout=2)


def test_healthz_is_503_until_the_model_is_loaded():
    release = threading.Event()

    def slow_load():
        release.wait(30)
        raise RuntimeError("never used")  # the model is not needed to see the two states

    with warnings.catch_warnings():  # starlette's note that its TestClient will want httpx2 one day
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    app = create_app(slow_load, ServeOptions(Limits(max_upload_bytes=1000, max_pixels=None)))
    with TestClient(app) as client:
        response = client.get("/healthz")
        assert response.status_code == 503 and response.json() == {"error": "the model is still loading"}
        assert client.post("/v1/predict", content=b"x").status_code == 503
        release.set()
        for _ in range(100):
            response = client.get("/healthz")
            if "failed" in response.text:
                break
            time.sleep(0.02)
        assert response.status_code == 503
        assert response.json() == {"error": "the model failed to load: cannot load the model: RuntimeError: "
                                            "never used"}
