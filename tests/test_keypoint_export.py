"""Keypoint models through `maskrcnn export`: the ONNX / TorchScript graph gains a keypoint_heatmaps output,
decoded after the graph as the eager model decodes it, so exported keypoints are the PyTorch ones."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_model
from maskrcnn import Predictor
from maskrcnn.export.files import export
from maskrcnn.export.runtime import ExportedModel

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "openvino": ".xml"}


def keypoint_model(kind: str):
    return tiny_model(masks=kind == "both", keypoints=3, keypoint_head_channels=32,
                      keypoint_names=("a", "b", "c"), skeleton=((1, 2),))


@pytest.fixture(scope="module")
def photos(val_images) -> list[np.ndarray]:
    arrays = []
    for path in val_images[:2]:
        with Image.open(path) as im:
            arrays.append(np.asarray(im.convert("RGB")))
    return arrays


@pytest.mark.parametrize("kind, fmt", [("keypoints", "onnx"), ("both", "onnx"), ("both", "torchscript"),
                                       ("keypoints", "openvino"), ("both", "openvino")])
def test_exported_keypoints_are_the_pytorch_ones(kind, fmt, photos, tmp_path):
    model = keypoint_model(kind)
    path = export(model, tmp_path / f"kp{SUFFIX[fmt]}", fmt)
    reference = Predictor(model, score_thresh=0.05, max_detections=20)
    runtime = Predictor(path, score_thresh=0.05, max_detections=20, trust_torchscript=True)
    assert isinstance(runtime.model, ExportedModel) and runtime.model.keypoint_names == ["a", "b", "c"]
    for photo in photos:
        expected, actual = reference(photo), runtime(photo)
        assert len(expected) > 5
        assert len(actual) == len(expected) and actual.has_masks == expected.has_masks == model.config.masks
        np.testing.assert_array_equal(actual.labels, expected.labels)
        np.testing.assert_allclose(actual.boxes, expected.boxes, rtol=0, atol=0.05)
        # the same argmax cells: x, y within the boxes' tolerance; scores (heatmap logits) within 1e-3
        np.testing.assert_allclose(actual.keypoints, expected.keypoints, rtol=0, atol=0.05)
        np.testing.assert_allclose(actual.keypoint_scores, expected.keypoint_scores, rtol=0, atol=1e-3)
        assert actual.skeleton == [(1, 2)]
