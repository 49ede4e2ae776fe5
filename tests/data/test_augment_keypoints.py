"""Keypoints under the augmentations: mirrored with left/right swapped on a flip, scaled with the image,
unlabelled (v = 0) where a crop cuts them off, and dropped with their instance. Expected values by hand."""

from __future__ import annotations

import pytest
import torch

from maskrcnn.data.augment import (LargeScaleJitter, RandomHorizontalFlip, ResizeShortestSide,
                                   drop_vanished_instances, keypoint_flip_order)

HEIGHT, WIDTH = 40, 80
NAMES = ["nose", "left_eye", "right_eye", "left_hand", "right_hand", "tail"]


def _sample():
    image = torch.rand(3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, HEIGHT, WIDTH, dtype=torch.uint8)
    masks[0, 5:20, 10:30] = 1
    masks[1, 10:35, 50:70] = 1
    keypoints = torch.tensor([
        [[20, 6, 2], [15, 8, 2], [25, 8, 1], [10, 15, 2], [30, 15, 2], [0, 0, 0]],
        [[60, 12, 2], [55, 14, 1], [65, 14, 2], [0, 0, 0], [70, 30, 2], [60, 34, 2]],
    ], dtype=torch.float32)
    target = {"boxes": torch.tensor([[10, 5, 30, 20], [50, 10, 70, 35]], dtype=torch.float32),
              "labels": torch.tensor([1, 1]), "masks": masks, "keypoints": keypoints}
    return image, target


def test_flip_order_pairs_left_and_right_by_name():
    assert keypoint_flip_order(NAMES) == [0, 2, 1, 4, 3, 5]
    coco = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
            "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
            "right_knee", "left_ankle", "right_ankle"]
    # torchvision's hard-coded table for COCO persons (references/detection/transforms.py).
    assert keypoint_flip_order(coco) == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
    assert keypoint_flip_order(["right_a", "b", "left_a"]) == [2, 1, 0]
    with pytest.raises(ValueError, match="keypoint 'left_paw' has no 'right_paw'"):
        keypoint_flip_order(["left_paw", "right_foot", "left_foot"])


def test_flip_mirrors_x_swaps_left_and_right_and_keeps_unlabelled_at_zero():
    image, target = _sample()
    _, out = RandomHorizontalFlip(1.0, keypoint_names=NAMES)(image, target)
    assert out["keypoints"].tolist() == [
        [[60, 6, 2], [55, 8, 1], [65, 8, 2], [50, 15, 2], [70, 15, 2], [0, 0, 0]],
        [[20, 12, 2], [15, 14, 2], [25, 14, 1], [10, 30, 2], [0, 0, 0], [20, 34, 2]],
    ]
    assert out["boxes"].tolist() == [[50, 5, 70, 20], [10, 10, 30, 35]]
    assert target["keypoints"][0, 1].tolist() == [15, 8, 2]  # the input is not modified
    _, twice = RandomHorizontalFlip(1.0, keypoint_names=NAMES)(*RandomHorizontalFlip(1.0, NAMES)(image, target))
    assert torch.equal(twice["keypoints"], target["keypoints"])


def test_flip_of_keypoints_without_their_names_is_refused():
    image, target = _sample()
    with pytest.raises(ValueError, match="needs the keypoint_names"):
        RandomHorizontalFlip(1.0)(image, target)
    with pytest.raises(ValueError, match="needs the keypoint_names"):
        RandomHorizontalFlip(1.0, keypoint_names=NAMES[:3])(image, target)
    _, unflipped = RandomHorizontalFlip(0.0)(image, target)
    assert torch.equal(unflipped["keypoints"], target["keypoints"])


def test_resize_scales_keypoints_and_leaves_visibility():
    image, target = _sample()
    _, out = ResizeShortestSide((20,), 1000)(image, target)  # 40x80 -> 20x40: half
    expected = target["keypoints"].clone()
    expected[..., :2] /= 2
    assert torch.equal(out["keypoints"], expected)
    assert out["keypoints"][0, 2].tolist() == [12.5, 4, 1]


def test_large_scale_jitter_scales_crops_and_unlabels_keypoints_outside():
    image, target = _sample()
    for seed in range(8):
        generator = torch.Generator().manual_seed(seed)
        out_image, out = LargeScaleJitter(80, (2.0, 2.0))(image, target, generator=generator)
        # 40x80 doubled is 80x160, cropped to the 80 columns from `left` on (every row kept).
        full = torch.nn.functional.interpolate(image[None], size=(80, 160), mode="bilinear", align_corners=False,
                                               antialias=True)[0]
        left = next(left for left in range(81) if torch.allclose(full[:, :, left:left + 80], out_image))
        doubled = target["masks"].repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)[:, :, left:left + 80]
        kept = [k for k in range(2) if doubled[k].any()]  # the others vanish with their keypoints
        assert len(out["keypoints"]) == len(out["boxes"]) == len(kept)
        for row, k in enumerate(kept):
            for point, (x, y, v) in zip(out["keypoints"][row].tolist(), target["keypoints"][k].tolist()):
                moved_x = 2 * x - left
                if v > 0 and 0 <= moved_x <= 80:
                    assert point == [moved_x, 2 * y, v]
                else:
                    assert point == [0, 0, 0]


def test_large_scale_jitter_hand_case_with_a_fixed_crop():
    image, target = _sample()
    # Scale 2 of a 40x80 image is 80x160; a 80x80 crop draws its left from 0..80: seed it to find one
    # that cuts the first instance's right hand (x 30 -> 60) but not its nose (x 20 -> 40).
    for seed in range(40):
        out_image, out = LargeScaleJitter(80, (2.0, 2.0))(image, target, generator=torch.Generator().manual_seed(seed))
        full = torch.nn.functional.interpolate(image[None], size=(80, 160), mode="bilinear", align_corners=False,
                                               antialias=True)[0]
        left = next(left for left in range(81) if torch.allclose(full[:, :, left:left + 80], out_image))
        if 40 < left < 60:
            break
    else:
        pytest.fail("no crop with its left edge in 41..59 in 40 seeds")
    first = out["keypoints"][0].tolist()
    assert first[0] == [0, 0, 0]  # nose at x 40, left of the crop
    assert first[4] == [60 - left, 30, 2]  # right hand at x 60
    assert first[5] == [0, 0, 0]  # never labelled


def test_dropped_instances_take_their_keypoints_along():
    _, target = _sample()
    target["boxes"][0] = torch.tensor([3, 3, 3.5, 9])
    out = drop_vanished_instances(target)
    assert out["labels"].tolist() == [1] and torch.equal(out["keypoints"], target["keypoints"][1:])
