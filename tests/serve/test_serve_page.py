"""The web page of `maskrcnn serve` in headless Chromium (Debian's, driven by Playwright): an upload is drawn,
the legend counts what the API answers, the score slider and the class toggles filter without a new request,
hover names the object, the JSON downloads, and a phone-width window needs no sideways scrolling.

`MASKRCNN_SCREENSHOT=docs/serve.png pytest tests/serve/test_serve_page.py` also writes the README's picture."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from serving import ServerProcess, post_image, save_tiny_checkpoint, without_timing

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("server")
    process = ServerProcess(save_tiny_checkpoint(folder), log=folder / "server.log")
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).is_file():
        pytest.fail("Debian's chromium is not installed (.ci/run installs it: apt-get install -y chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def class_counts(instances, threshold: float) -> dict[str, int]:
    return dict(Counter(i["category_name"] for i in instances if i["score"] > threshold))


def page_counts(page) -> dict[str, int]:
    rows = page.locator("#classes li").evaluate_all(
        "items => items.map(li => [li.dataset.class, Number(li.dataset.count)])")
    return {name: count for name, count in rows if count}


def summary_total(page) -> int:
    return int(page.locator("#summary").get_attribute("data-total"))


def test_page_draws_counts_and_filters(server, browser, val_images, tmp_path):
    photo = val_images[0]
    api = post_image(server.url, photo, params={"score_thresh": "0.05"}).json()
    default = post_image(server.url, photo).json()["instances"]  # the server's defaults: score above 0.5
    page = browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-line').textContent.includes('classes')")
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("body[data-state=drawn]", timeout=60_000)

    # The legend counts what the API answers with its default threshold (the slider's start).
    assert page.locator("#score").input_value() == "0.5"
    expected = class_counts(default, 0.5)
    assert expected == dict(Counter(i["category_name"] for i in default)) and len(expected) >= 2
    assert page_counts(page) == expected and summary_total(page) == len(default)
    parts = ", ".join(f"{n} {name}" for name, n in sorted(expected.items(), key=lambda kv: (-kv[1], kv[0])))
    assert page.locator("#summary").inner_text() == f"{len(default)} objects: {parts}"
    page.screenshot(path=str(tmp_path / "serve.png"))
    if os.environ.get("MASKRCNN_SCREENSHOT"):  # the README's picture, in 256 colours (a quarter of the bytes)
        shot = Image.open(tmp_path / "serve.png").convert("RGB")
        shot.quantize(256, method=Image.Quantize.MAXCOVERAGE).save(os.environ["MASKRCNN_SCREENSHOT"], optimize=True)

    # Hover: the best object is on top everywhere in its mask.
    best = max(api["instances"], key=lambda i: i["score"])
    mask = mask_utils.decode(dict(best["segmentation"], counts=best["segmentation"]["counts"].encode()))
    ys, xs = np.nonzero(mask)
    box = page.locator("#canvas").bounding_box()
    scale = box["width"] / api["width"]
    page.mouse.move(box["x"] + (xs[len(xs) // 2] + 0.5) * scale, box["y"] + (ys[len(ys) // 2] + 0.5) * scale)
    assert page.locator("#tip").inner_text() == f"{best['category_name']} {best['score']:.2f}"

    # The slider filters without a new request: the counts become the API's at the new threshold.
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    scores = sorted(i["score"] for i in default)
    threshold = round(float(np.median(scores)), 2)
    page.locator("#score").fill(str(threshold))
    higher = post_image(server.url, photo, params={"score_thresh": str(threshold)}).json()["instances"]
    assert page_counts(page) == class_counts(higher, threshold) and summary_total(page) == len(higher)
    assert len(higher) < len(default)

    # A class toggle hides that class from the total and the picture.
    name = max(expected, key=expected.get)
    page.locator(f"#classes li[data-class='{name}'] input").uncheck()
    assert summary_total(page) == len(higher) - class_counts(higher, threshold).get(name, 0)
    assert requests == []

    # The JSON button downloads the answer the page got.
    with page.expect_download() as download:
        page.click("#download")
    saved = json.loads(Path(download.value.path()).read_text())
    assert without_timing(saved) == without_timing(api)
    page.close()


def test_page_fits_a_phone_width_window(server, browser, val_images, tmp_path):
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-line').textContent.includes('classes')")
    page.set_input_files("#file", str(val_images[1]))
    page.wait_for_selector("body[data-state=drawn]", timeout=60_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    canvas = page.locator("#canvas").bounding_box()
    panel = page.locator("#panel").bounding_box()
    assert canvas["width"] <= 390 and panel["y"] >= canvas["y"] + canvas["height"]  # the legend below the image
    page.screenshot(path=str(tmp_path / "serve-phone.png"), full_page=True)
    page.close()
