"""Our model loaded from a torchvision Keypoint R-CNN state dict gives torchvision's detections and
keypoints, one to one (and with a mask branch too: a person model with both heads)."""

from __future__ import annotations

import pytest
import torch

import maskrcnn
from conftest import coco_mini, read_rgb, torchvision_keypoint_reference

BOX_TOL, SCORE_TOL, KEYPOINT_TOL, KEYPOINT_SCORE_TOL, MASK_TOL = 0.01, 1e-4, 0.01, 1e-3, 1e-4
DETECTIONS = 20


@pytest.fixture(scope="module", params=["keypoints", "both"])
def pair(request, tmp_path_factory):
    reference = torchvision_keypoint_reference(masks=request.param == "both")
    path = tmp_path_factory.mktemp("ckpt") / f"torchvision_{request.param}.pth"
    torch.save(reference.state_dict(), path)
    # the keypoint head (eight 512-channel convs per detection) dominates the time: 20 detections per image
    reference.roi_heads.detections_per_img = DETECTIONS
    return request.param, reference, maskrcnn.load(path, detections_per_img=DETECTIONS)


def photo(name: str) -> torch.Tensor:
    return read_rgb(coco_mini() / "val2017" / f"{name}.jpg")


def assert_same(expected: dict, actual: dict) -> None:
    assert actual["boxes"].shape == expected["boxes"].shape, "different number of detections"
    assert torch.equal(actual["labels"], expected["labels"])
    assert actual["keypoints"].shape == expected["keypoints"].shape == (len(expected["boxes"]), 17, 3)
    assert actual["keypoints_scores"].shape == expected["keypoints_scores"].shape
    assert ("masks" in actual) == ("masks" in expected)
    if len(expected["boxes"]):
        assert (actual["boxes"] - expected["boxes"]).abs().max() <= BOX_TOL
        assert (actual["scores"] - expected["scores"]).abs().max() <= SCORE_TOL
        assert (actual["keypoints"] - expected["keypoints"]).abs().max() <= KEYPOINT_TOL
        assert (actual["keypoints_scores"] - expected["keypoints_scores"]).abs().max() <= KEYPOINT_SCORE_TOL
        if "masks" in expected:
            assert (actual["masks"] - expected["masks"]).abs().max() <= MASK_TOL


def test_architecture_detected_from_keys(pair):
    kind, _, ours = pair
    c = ours.config
    assert (c.keypoints, c.masks, c.num_classes) == (17, kind == "both", 2)
    assert ours.class_names == ["__background__", "person"]
    assert ours.keypoint_names[0] == "nose" and ours.keypoint_names[16] == "right_ankle"
    assert (16, 14) in c.skeleton and len(c.skeleton) == 19
    assert hasattr(ours, "mask_head") == (kind == "both")


def test_single_real_image(pair):
    kind, reference, ours = pair
    if kind == "both":
        pytest.skip("the batch test covers the model with both heads (one 800-pixel photo costs seconds)")
    image = photo("000000350679")  # nine annotated people
    with torch.no_grad():
        expected, actual = reference([image])[0], ours([image])[0]
    assert len(expected["boxes"]) == DETECTIONS, "reference should detect plenty for a meaningful comparison"
    assert 0.05 < expected["scores"].min() and expected["scores"].max() < 0.9999, "scores should be spread out"
    assert expected["keypoints_scores"].std() > 1, "keypoint scores should be spread out"
    assert_same(expected, actual)


def test_batch_of_mixed_sizes(pair):
    _, reference, ours = pair
    images = [photo("000000151938")[:, :400, :333], photo("000000183709")[:, 100:340, 60:380]]
    with torch.no_grad():
        expected, actual = reference(images), ours(images)
    assert all(len(e["boxes"]) >= 3 for e in expected), "reference should detect something in each image"
    assert 0.05 < expected[0]["scores"].min() and expected[0]["scores"].max() < 0.999, "scores should be spread out"
    for e, a in zip(expected, actual):
        assert_same(e, a)
