"""The server with an exported ONNX file: what `Predictor` (hence `maskrcnn predict`) answers for that file.
In-process (the ASGI app with Starlette's test client): the HTTP side is covered by test_serve_api.py."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

from maskrcnn import Predictor
from maskrcnn.export.files import export
from maskrcnn.serve import Limits, ServeOptions, create_app
from conftest import tiny_model
from test_export import one_detection_when_traced

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_onnx_file_is_served_like_predict(val_images, tmp_path):
    with warnings.catch_warnings():  # starlette's note that its TestClient will want httpx2 one day
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient

    model = tiny_model()
    with torch.no_grad():
        model.mask_predictor.logits.bias.fill_(-1.0)  # as test_export's model: no pixel exactly at 0.5
    one_detection_when_traced(model)
    onnx_file = export(model, tmp_path / "tiny.onnx", "onnx")

    app = create_app(lambda: Predictor(onnx_file, score_thresh=0.5),
                     ServeOptions(Limits(max_upload_bytes=10**7, max_pixels=None)))
    expected = Predictor(onnx_file, score_thresh=0.5)
    with TestClient(app) as client:
        for _ in range(600):  # the model loads in the background
            if client.get("/healthz").status_code == 200:
                break
            time.sleep(0.05)
        described = client.get("/v1/model").json()
        assert described["architecture"]["runtime"] == "onnx/torchscript" and described["precision"] == "fp32"
        for path in val_images[:2]:
            answer = client.post("/v1/predict", files={"image": (path.name, path.read_bytes(), "image/jpeg")})
            assert answer.status_code == 200, answer.text
            wanted = [{k: v for k, v in e.items() if k != "file_name"} for e in expected(path).to_coco()]
            assert wanted and answer.json()["instances"] == wanted
