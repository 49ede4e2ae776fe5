"""`maskrcnn serve` over real HTTP (a uvicorn subprocess, httpx): answers equal `maskrcnn predict`'s, every
refusal is one JSON line with its status code, concurrent uploads never mix, metrics count what happened."""

from __future__ import annotations

import io
import json
import re
import threading

import httpx
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from serving import ServerProcess, post_image, save_tiny_checkpoint, without_timing
from test_cli_predict import run_cli

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

MAX_UPLOAD_MB = 0.2   # small limits, so that the refusals are cheap to provoke
MAX_PIXELS_MP = 0.5   # COCO photos (640x480 at most = 0.31 MP) pass


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def server(weights, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = ServerProcess(weights, "--max-upload-mb", MAX_UPLOAD_MB, "--max-pixels", MAX_PIXELS_MP,
                            "--queue-size", 16, log=log)
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def images(val_images):
    return val_images[:3]


def cli_predictions(weights, images, out, *options) -> dict[str, list]:
    """predictions.json of `maskrcnn predict` on `images`, by file name (one thread, like the server)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        status, _, err = run_cli("predict", "--weights", weights, "--device", "cpu", "--no-progress", "--out", out, *options, *images)
    finally:
        torch.set_num_threads(before)
    assert status == 0, err
    found: dict[str, list] = {str(p): [] for p in images}
    for entry in json.loads((out / "predictions.json").read_text()):
        found[entry.pop("file_name")].append(entry)
    return found


def assert_same_instances(served: list[dict], expected: list[dict]) -> None:
    assert len(served) == len(expected)
    for ours, theirs in zip(served, expected):
        assert (ours["category_id"], ours["category_name"]) == (theirs["category_id"], theirs["category_name"])
        np.testing.assert_allclose(ours["bbox"], theirs["bbox"], atol=0.01)
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-4)
        assert ours["segmentation"] == theirs["segmentation"]


# ---------------------------------------------------------------------------------------------- answers

@pytest.mark.parametrize("options", [{}, {"score_thresh": "0.9", "max_detections": "5"}])
def test_answers_equal_cli_predict(server, weights, images, tmp_path, options):
    flags = [x for name, value in options.items() for x in (f"--{name.replace('_', '-')}", value)]
    expected = cli_predictions(weights, images, tmp_path / "out", *flags)
    for path in images:
        response = post_image(server.url, path, params=options)
        assert response.status_code == 200, response.text
        answer = response.json()
        with Image.open(path) as im:
            assert (answer["width"], answer["height"]) == im.size
        assert expected[str(path)], "the tiny model finds things in these photos"
        assert_same_instances(answer["instances"], expected[str(path)])
        assert set(answer["timing_ms"]) >= {"decode", "queue", "inference", "total"}


def test_raw_image_body_gives_the_multipart_answer(server, images):
    multipart = post_image(server.url, images[0]).json()
    raw = httpx.post(server.url + "/v1/predict", content=images[0].read_bytes(),
                     headers={"Content-Type": "image/jpeg"}, timeout=60).json()
    assert without_timing(raw) == without_timing(multipart)


def test_overlay_is_predicts_overlay(server, weights, images, tmp_path):
    run_cli("predict", "--weights", weights, "--device", "cpu", "--no-progress", "--out", tmp_path, images[0])
    response = post_image(server.url, images[0], route="/v1/predict/overlay")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    served = np.asarray(Image.open(io.BytesIO(response.content)))
    written = np.asarray(Image.open(tmp_path / f"{images[0].stem}.png"))
    np.testing.assert_array_equal(served, written)


def test_mask_formats(server, images):
    rle = post_image(server.url, images[0]).json()["instances"]
    polygons = post_image(server.url, images[0], params={"mask_format": "polygon"}).json()["instances"]
    none = post_image(server.url, images[0], params={"mask_format": "none"}).json()["instances"]
    assert [{k: v for k, v in i.items() if k != "segmentation"} for i in rle] == none
    assert all("segmentation" not in i for i in none)
    height, width = rle[0]["segmentation"]["size"]
    for with_rle, with_polygons in zip(rle, polygons):
        mask = mask_utils.decode(dict(with_rle["segmentation"], counts=with_rle["segmentation"]["counts"].encode()))
        outline = with_polygons["segmentation"]
        assert outline and all(len(p) >= 6 and len(p) % 2 == 0 for p in outline)
        # Every outline point is the centre of a mask pixel on the object's border.
        for polygon in outline:
            xs, ys = np.asarray(polygon[0::2]), np.asarray(polygon[1::2])
            assert mask[(ys - 0.5).astype(int), (xs - 0.5).astype(int)].all()


def test_model_description(server, weights):
    answer = httpx.get(server.url + "/v1/model").json()
    assert answer["class_names"] == ["__background__", "cat", "dog", "bird"]
    # serve's default --precision auto: bf16 on a CPU with native bf16, fp32-fast on others
    from maskrcnn.precision import cpu_has_native_bf16

    assert (answer["precision"], answer["device"]) == ("bf16" if cpu_has_native_bf16() else "fp32-fast", "cpu")
    assert answer["architecture"]["depth"] == 18 and answer["architecture"]["min_size"] == 128
    assert answer["input_limits"]["max_pixels"] == MAX_PIXELS_MP * 1e6
    assert answer["input_limits"]["max_upload_mb"] == MAX_UPLOAD_MB
    assert answer["defaults"] == {"score_thresh": 0.5, "max_detections": 100, "mask_threshold": 0.5,
                                  "mask_format": "rle"}
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}


# ---------------------------------------------------------------------------------------------- refusals

def _chunks(data: bytes, size: int = 16384):
    for start in range(0, len(data), size):
        yield data[start:start + size]


def _big_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1000, 800), (90, 120, 30)).save(buffer, format="PNG")  # 0.8 MP in a few kB
    return buffer.getvalue()


def bad_requests(images, tmp_path):
    jpeg = images[0].read_bytes()
    oversize = jpeg * (int(MAX_UPLOAD_MB * 1e6) // len(jpeg) + 2)
    return {
        "empty": (dict(content=b"", headers={"Content-Type": "image/jpeg"}), 400, "empty body"),
        "not an image": (dict(files={"image": ("notes.txt", b"just some text", "text/plain")}), 422,
                         "notes.txt: cannot read image"),
        "truncated": (dict(files={"image": ("cut.jpg", jpeg[:len(jpeg) // 2], "image/jpeg")}), 422,
                      "cut.jpg: image file is truncated"),
        "no image field": (dict(files={"picture": ("a.jpg", jpeg, "image/jpeg")}), 422, "no file field named 'image'"),
        "wrong type": (dict(content=b'{"image": 1}', headers={"Content-Type": "application/json"}), 415,
                       "Content-Type 'application/json'"),
        "too large": (dict(content=oversize, headers={"Content-Type": "image/jpeg"}), 413, "larger than the limit"),
        "too large, chunked": (dict(content=_chunks(oversize), headers={"Content-Type": "image/jpeg"}), 413,
                               "larger than the limit of 0.2 MB"),
        "too many pixels": (dict(content=_big_png(), headers={"Content-Type": "image/png"}), 413,
                            "1000x800 = 0.8 million pixels, over the limit of 0.5 million"),
        "bad score": (dict(params={"score_thresh": "nan"}, content=jpeg, headers={"Content-Type": "image/jpeg"}), 422,
                      "score_thresh must be a number between 0 and 1, got nan"),
        "bad count": (dict(params={"max_detections": "0"}, content=jpeg, headers={"Content-Type": "image/jpeg"}),
                      422, "max_detections must be a positive integer, got 0"),
        "bad format": (dict(params={"mask_format": "svg"}, content=jpeg, headers={"Content-Type": "image/jpeg"}),
                       422, "mask_format must be one of rle, polygon, none, got 'svg'"),
        "unknown option": (dict(params={"treshold": "0.3"}, content=jpeg, headers={"Content-Type": "image/jpeg"}),
                           422, "unknown query option 'treshold'"),
    }


CASES = ["empty", "not an image", "truncated", "no image field", "wrong type", "too large", "too large, chunked",
         "too many pixels", "bad score", "bad count", "bad format", "unknown option"]


@pytest.mark.parametrize("case", CASES)
def test_bad_request_is_one_json_line(server, images, tmp_path, case):
    request, status, words = bad_requests(images, tmp_path)[case]
    response = httpx.post(server.url + "/v1/predict", timeout=60, **request)
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and "\n" not in body["error"] and words in body["error"], body
    assert httpx.get(server.url + "/healthz").status_code == 200  # still serving


@pytest.mark.parametrize("method, path, status", [("GET", "/nowhere", 404), ("GET", "/v1/predict", 405),
                                                  ("DELETE", "/v1/model", 405)])
def test_unknown_routes_are_json_errors(server, method, path, status):
    response = httpx.request(method, server.url + path)
    assert response.status_code == status and list(response.json()) == ["error"]


# ---------------------------------------------------------------------------------------------- load

def test_concurrent_uploads_get_their_own_answers(server, images):
    sequential = {path: without_timing(post_image(server.url, path).json()) for path in images}
    assert len({json.dumps(answer) for answer in sequential.values()}) == len(images)  # all different
    order = [images[i % len(images)] for i in range(12)]
    answers: list = [None] * len(order)
    barrier = threading.Barrier(len(order))

    def upload(i):
        barrier.wait()
        answers[i] = post_image(server.url, order[i])

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(order))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for path, response in zip(order, answers):
        assert response.status_code == 200, response.text
        assert without_timing(response.json()) == sequential[path]


def _metric(text: str, name: str, **labels) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def test_metrics_count_requests(server, images):
    before = httpx.get(server.url + "/metrics").text
    for path in images[:2]:
        post_image(server.url, path)
    httpx.post(server.url + "/v1/predict", content=b"", headers={"Content-Type": "image/png"})
    after = httpx.get(server.url + "/metrics").text
    ok = dict(path="/v1/predict", status="200")
    bad = dict(path="/v1/predict", status="400")
    assert _metric(after, "maskrcnn_requests_total", **ok) - _metric(before, "maskrcnn_requests_total", **ok) == 2
    assert _metric(after, "maskrcnn_requests_total", **bad) - _metric(before, "maskrcnn_requests_total", **bad) == 1
    assert _metric(after, "maskrcnn_images_total") - _metric(before, "maskrcnn_images_total") == 2
    seconds = "maskrcnn_request_seconds_count"
    assert _metric(after, seconds, path="/v1/predict") - _metric(before, seconds, path="/v1/predict") == 3
    assert _metric(after, "maskrcnn_queue_depth") == 0 and _metric(after, "maskrcnn_queue_limit") == 16
    assert "\nmaskrcnn_images_running 0.0\n" in after
    assert _metric(after, "maskrcnn_images_per_second") > 0
