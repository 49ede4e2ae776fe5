"""A keypoint model's outputs everywhere: Predictor -> Detections with keypoints, COCO keypoint results,
skeleton drawing, keypoint names / skeleton kept by checkpoints, and `maskrcnn predict` with no new flags."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import maskrcnn
from conftest import tiny_model
from maskrcnn import Predictor
from maskrcnn.cli import main
from maskrcnn.modeling.model import model_setting_problems
from maskrcnn.results import Detections
from maskrcnn.weights import save_checkpoint

NAMES = ("head", "left_hand", "right_hand")
SKELETON = ((1, 2), (1, 3))


@pytest.fixture(scope="module")
def model():
    return tiny_model(masks=False, keypoints=3, keypoint_head_channels=32, keypoint_names=NAMES, skeleton=SKELETON)


@pytest.fixture(scope="module")
def image(val_images) -> np.ndarray:
    with Image.open(val_images[0]) as im:
        return np.asarray(im.convert("RGB").resize((240, 160), Image.BILINEAR)).copy()


def test_predictor_keeps_the_models_keypoints(model, image):
    dets = Predictor(model, max_detections=5)(image)
    with torch.no_grad():
        raw = model.predict([torch.from_numpy(image).permute(2, 0, 1).float() / 255],
                            settings=model.inference_settings(detections_per_img=5))[0]
    assert "masks" not in raw and raw["keypoints"].shape == (len(raw["boxes"]), 3, 3)
    assert len(dets) == len(raw["boxes"]) > 0 and not dets.has_masks
    order = np.argsort(-raw["scores"].numpy(), kind="stable")
    np.testing.assert_allclose(dets.keypoints, raw["keypoints"].numpy()[order], atol=1e-4)
    np.testing.assert_allclose(dets.keypoint_scores, raw["keypoints_scores"].numpy()[order], atol=1e-4)
    assert dets.keypoint_names == list(NAMES) and dets.skeleton == list(SKELETON)
    # keypoints lie in their boxes' neighbourhood (decoded inside each box)
    x, y = dets.keypoints[..., 0], dets.keypoints[..., 1]
    assert (x >= dets.boxes[:, None, 0] - 1).all() and (x <= dets.boxes[:, None, 2] + 1).all()
    assert (y >= dets.boxes[:, None, 1] - 1).all() and (y <= dets.boxes[:, None, 3] + 1).all()
    assert dets[1:].keypoints.shape == (len(dets) - 1, 3, 3)  # subsets keep them


def test_coco_keypoint_results_and_no_segmentation():
    dets = Detections([[10, 10, 50, 60]], [1], [0.9], None, ["__background__", "person"], image_size=(80, 100),
                      keypoints=[[[12.25, 20.5, 1], [30, 40, 1], [0, 0, 0]]], keypoint_scores=[[3.5, 2.0, -1.0]])
    (entry,) = dets.to_coco(image_id=7)
    assert entry["keypoints"] == [12.25, 20.5, 1, 30.0, 40.0, 1, 0.0, 0.0, 0]
    assert entry["keypoint_scores"] == [3.5, 2.0, -1.0]
    assert "segmentation" not in entry and entry["bbox"] == [10.0, 10.0, 40.0, 50.0]


def test_skeleton_is_drawn():
    kwargs = dict(keypoints=[[[20, 20, 1], [80, 20, 1], [50, 70, 0]]], keypoint_scores=[[1.0, 1.0, 1.0]])
    dets = Detections([[5, 5, 95, 95]], [1], [0.9], None, ["__background__", "person"], image_size=(100, 100),
                      skeleton=[(1, 2), (1, 3)], **kwargs)
    plain = Detections([[5, 5, 95, 95]], [1], [0.9], None, ["__background__", "person"], image_size=(100, 100))
    canvas = np.zeros((100, 100, 3), dtype=np.uint8)
    drawn, without = dets.draw(canvas, show_legend=False), plain.draw(canvas, show_legend=False)
    assert (drawn[20, 20] != 0).any() and (drawn[20, 50] != 0).any()  # the dots and the edge between them
    assert (without[20, 50] == 0).all() and (without[20, 20] == 0).all()
    assert (drawn[45, 35] == 0).all()  # the edge to an invisible keypoint is not drawn


def test_checkpoint_keeps_keypoint_names_and_skeleton(model, tmp_path):
    save_checkpoint(model, tmp_path / "kp.safetensors")
    loaded = maskrcnn.load(tmp_path / "kp.safetensors")
    assert loaded.keypoint_names == list(NAMES) and loaded.skeleton == list(SKELETON)
    assert loaded.config.keypoints == 3 and not loaded.config.masks


def test_keypoint_settings_are_checked():
    with pytest.raises(ValueError, match="keypoint_names has 2 names for keypoints=3"):
        tiny_model(keypoints=3, keypoint_names=("a", "b"))
    with pytest.raises(ValueError, match="skeleton edge"):
        tiny_model(keypoints=3, skeleton=((1, 4),))
    with pytest.raises(ValueError, match="needs a mask branch"):
        tiny_model(masks=False)
    with pytest.raises(ValueError, match="masks must be true or false"):
        tiny_model(masks="no")
    # overrides alone (--model-option masks=false): the keypoint count comes from the dataset later
    assert model_setting_problems({"masks": False}) == []
    assert model_setting_problems({"masks": False, "keypoints": 0}) == [
        "a model needs a mask branch (masks) or a keypoint branch (keypoints > 0)"]


def test_predict_command_writes_keypoint_results(model, val_images, tmp_path):
    save_checkpoint(model, tmp_path / "kp.safetensors")
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        status = main(["predict", "--weights", str(tmp_path / "kp.safetensors"), "--out", str(out), "--device",
                       "cpu", "--max-detections", "4", "--no-progress", str(val_images[0])])
    assert status == 0
    entries = json.loads((out / "predictions.json").read_text())
    assert entries and all(len(e["keypoints"]) == 9 and "segmentation" not in e for e in entries)
    assert (out / f"{val_images[0].stem}.png").is_file()
