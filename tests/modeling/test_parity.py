"""Our model loaded from a torchvision state dict gives torchvision's detections, one to one."""

from __future__ import annotations

import pytest
import torch

import maskrcnn
from conftest import coco_mini, read_rgb, torchvision_reference

BOX_TOL, SCORE_TOL, MASK_TOL = 0.01, 1e-4, 1e-4


@pytest.fixture(scope="module", params=["v1", "v2"])
def pair(request, tmp_path_factory):
    reference = torchvision_reference(request.param)
    path = tmp_path_factory.mktemp("ckpt") / f"torchvision_{request.param}.pth"
    torch.save(reference.state_dict(), path)
    ours = maskrcnn.load(path, score_thresh=0.05)
    return request.param, reference, ours


def assert_same_detections(expected: dict, actual: dict) -> None:
    assert actual["boxes"].shape == expected["boxes"].shape, "different number of detections"
    assert torch.equal(actual["labels"], expected["labels"])
    assert actual["labels"].dtype == torch.int64
    if len(expected["boxes"]):
        assert (actual["boxes"] - expected["boxes"]).abs().max() <= BOX_TOL
        assert (actual["scores"] - expected["scores"]).abs().max() <= SCORE_TOL
        assert (actual["masks"] - expected["masks"]).abs().max() <= MASK_TOL
    assert actual["masks"].shape == expected["masks"].shape


def test_architecture_detected_from_keys(pair):
    version, _, ours = pair
    assert ours.config.num_classes == 91
    assert ours.config.box_head == ("mlp" if version == "v1" else "conv")
    assert ours.config.rpn_conv_depth == (1 if version == "v1" else 2)
    assert ours.class_names[1] == "person" and not ours.training


def photo(name: str) -> torch.Tensor:
    return read_rgb(coco_mini() / "val2017" / f"{name}.jpg")


@pytest.mark.parametrize("name", ["000000000139", "000000062554", "000000269196"])
def test_single_real_images(pair, name):
    _, reference, ours = pair
    image = photo(name)
    with torch.no_grad():
        expected, actual = reference([image])[0], ours([image])[0]
    assert len(expected["boxes"]) >= 20, "reference should detect plenty for a meaningful comparison"
    assert 0.05 < expected["scores"].min() and expected["scores"].max() < 0.9999, "scores should be spread out"
    assert_same_detections(expected, actual)
    assert actual["masks"].shape[-2:] == image.shape[-2:]


def test_batch_of_mixed_sizes(pair):
    _, reference, ours = pair
    images = [photo("000000018575"), photo("000000106235")[:, :300, :457], torch.rand(3, 200, 180)]
    assert len({im.shape for im in images}) == 3
    with torch.no_grad():
        expected, actual = reference(images), ours(images)
    for e, a in zip(expected, actual):
        assert_same_detections(e, a)


def test_image_with_zero_detections(pair, tmp_path):
    version, reference, _ = pair
    path = tmp_path / "ref.pth"
    torch.save(reference.state_dict(), path)
    ours = maskrcnn.load(path, score_thresh=0.9999)
    reference.roi_heads.score_thresh = 0.9999
    try:
        image = torch.full((3, 240, 320), 0.5)
        with torch.no_grad():
            expected, actual = reference([image])[0], ours([image])[0]
    finally:
        reference.roi_heads.score_thresh = 0.05
    assert len(expected["boxes"]) == 0
    assert_same_detections(expected, actual)
    assert actual["masks"].shape == (0, 1, 240, 320)
