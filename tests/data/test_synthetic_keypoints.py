"""`maskrcnn shapes --keypoints`: figures whose tips are COCO keypoints. The json is valid for pycocotools'
keypoint evaluation, each keypoint is a tip of its drawn figure with COCO's visibility, and the left/right
names follow the image (so a flip has to swap them)."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.cli import main
from maskrcnn.data.augment import RandomHorizontalFlip
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.synthetic import make_shapes

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE = 128
NAMES = ["head", "left_hand", "right_hand", "left_foot", "right_foot"]


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    summary = make_shapes(root, num_train=24, num_val=4, size=SIZE, seed=5, progress=False, keypoints=True)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(summary["train_annotations"])
    return root, summary, coco


def test_the_json_is_a_coco_keypoint_file_that_pycocotools_scores(figures):
    root, summary, coco = figures
    assert summary["train_annotations"] == str(root / "annotations" / "keypoints_train.json")
    assert coco.dataset["categories"] == [{"id": 1, "name": "figure", "supercategory": "shape", "keypoints": NAMES,
                                           "skeleton": [[1, 2], [1, 3], [2, 4], [3, 5], [4, 5]]}]
    annotations = coco.dataset["annotations"]
    assert len(annotations) >= 24
    results = [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": 1.0}
               for a in annotations]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), "keypoints")
        evaluation.params.kpt_oks_sigmas = np.full(5, 0.07)  # pycocotools' default is for 17 person keypoints
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)
    for annotation in annotations:
        assert annotation["num_keypoints"] == sum(v > 0 for v in annotation["keypoints"][2::3])


def test_keypoints_are_tips_of_the_drawn_figures_with_coco_visibility(figures):
    _, _, coco = figures
    seen = {0: 0, 1: 0, 2: 0}
    for image_id, image in coco.imgs.items():
        annotations = coco.imgToAnns[image_id]
        masks = [coco.annToMask(a).astype(bool) for a in annotations]
        for annotation, mask in zip(annotations, masks):
            points = np.array(annotation["keypoints"], dtype=float).reshape(5, 3)
            if isinstance(annotation["segmentation"], list):  # whole outline visible: tips are its corners
                outline = np.array(annotation["segmentation"][0]).reshape(-1, 2)
                np.testing.assert_array_equal(points[:, :2], outline[0::2][_tip_order(outline)])
            ys, xs = np.nonzero(mask)
            others = np.logical_or.reduce([m for m in masks if m is not mask] or [np.zeros_like(mask)])
            for x, y, v in points:
                seen[int(v)] += 1
                if v == 0:
                    assert (x, y) == (0, 0)
                    continue
                assert 0 <= x < image["width"] and 0 <= y < image["height"]
                # Visible: its mask shows within 2.5 px of the tip (a sharp tip rasterizes thin); hidden: it does
                # not, and a figure in front shows there.
                distance = np.hypot(xs + 0.5 - x, ys + 0.5 - y).min() if len(xs) else np.inf
                if v == 2:
                    assert distance <= 2.5, (annotation["id"], x, y)
                else:
                    assert distance > 2.5 and others[int(y), int(x)], (annotation["id"], x, y)
    assert seen[2] > 50 and seen[1] > 0 and seen[0] > 0, seen  # every visibility occurs


def _tip_order(outline: np.ndarray) -> np.ndarray:
    """Which corner (0..4, every other outline point) is head, left_hand, right_hand, left_foot, right_foot, by
    position: the head is the highest tip, hands the next two, feet the lowest two; left by x."""
    tips = outline[0::2]
    by_height = np.argsort(tips[:, 1], kind="stable")
    head, hands, feet = by_height[0], by_height[1:3], by_height[3:]
    hands = hands[np.argsort(tips[hands, 0])]
    feet = feet[np.argsort(tips[feet, 0])]
    return np.array([head, hands[0], hands[1], feet[0], feet[1]])


def test_left_is_on_the_left_before_and_after_a_flip(figures):
    root, summary, _ = figures
    dataset = CocoDataset(summary["train_annotations"], root / "train")
    assert dataset.keypoint_names == NAMES and dataset.skeleton == [[1, 2], [1, 3], [2, 4], [3, 5], [4, 5]]
    flip = RandomHorizontalFlip(1.0, keypoint_names=dataset.keypoint_names)
    pairs = 0
    for index in range(len(dataset)):
        image, target = dataset[index]
        for keypoints in (target["keypoints"], flip(image, target)[1]["keypoints"]):
            for left, right in ((1, 2), (3, 4)):
                both = (keypoints[:, left, 2] > 0) & (keypoints[:, right, 2] > 0)
                assert (keypoints[both, left, 0] < keypoints[both, right, 0]).all()
                pairs += int(both.sum())
    assert pairs > 40


def test_cli_writes_the_keypoint_dataset(tmp_path, capsys):
    assert main(["shapes", str(tmp_path / "out"), "--train", "2", "--val", "1", "--size", "64", "--keypoints"]) == 0
    data = json.loads((tmp_path / "out" / "annotations" / "keypoints_val.json").read_text())
    assert data["categories"][0]["keypoints"] == NAMES and len(data["images"]) == 1
    assert not (tmp_path / "out" / "annotations" / "instances_val.json").exists()
    assert "wrote 2 train / 1 val images" in capsys.readouterr().out
