"""Keypoint OKS AP: coco_evaluate against pycocotools' COCOeval(iouType="keypoints") called directly, on the
committed COCO person keypoints and on a hand-made set with other keypoint names; results in COCO format
fed straight in (no model), and predict_dataset carrying a model's keypoints into the results."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from conftest import coco_mini
from test_evaluate import _direct  # pycocotools called directly
from maskrcnn.engine.evaluate import coco_evaluate, default_iou_types, format_metrics_table, predict_dataset
from maskrcnn.errors import MaskRCNNError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

KP_STATS = ("AP", "AP50", "AP75", "APm", "APl")


@pytest.fixture(scope="module")
def gt():
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(coco_mini() / "annotations" / "person_keypoints_val2017.json"))


@pytest.fixture(scope="module")
def perfect(gt):
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "keypoints": list(a["keypoints"]),
             "score": 1.0} for a in gt.dataset["annotations"] if not a["iscrowd"] and a["num_keypoints"] > 0]


def _noisy(gt: COCO, seed: int = 0) -> list[dict]:
    """Keypoints moved by a few percent of the person's size, some people missed, false positives."""
    rng = np.random.default_rng(seed)
    results = []
    for a in gt.dataset["annotations"]:
        if a["iscrowd"] or a["num_keypoints"] == 0 or rng.random() < 0.15:
            continue
        points = np.array(a["keypoints"], dtype=float).reshape(-1, 3)
        points[:, :2] += rng.normal(0, 0.04 * np.sqrt(a["area"]), (len(points), 2))
        points[:, 2] = 1
        results.append({"image_id": a["image_id"], "category_id": 1, "keypoints": points.ravel().tolist(),
                        "score": float(rng.random())})
    for image_id in gt.getImgIds():
        info = gt.imgs[image_id]
        points = np.stack([rng.uniform(0, info["width"], 17), rng.uniform(0, info["height"], 17), np.ones(17)], 1)
        results.append({"image_id": image_id, "category_id": 1, "keypoints": points.ravel().tolist(),
                        "score": float(rng.random() * 0.5)})
    return results


def test_ground_truth_as_results_scores_one(gt, perfect):
    metrics = coco_evaluate(gt, perfect, iou_types=("keypoints",), verbose=False)
    assert set(metrics["keypoints"]) == set(KP_STATS)
    for name in ("AP", "AP50", "AP75", "APl"):
        assert metrics["keypoints"][name] == pytest.approx(1.0, abs=1e-9), name
    assert metrics["per_class"]["keypoints"] == {"person": pytest.approx(1.0, abs=1e-9)}


def test_matches_pycocotools_directly(gt):
    noisy = _noisy(gt)
    metrics = coco_evaluate(gt, noisy, iou_types=("keypoints",), verbose=False)
    expected = _direct(gt, noisy, "keypoints")[:5]
    assert [metrics["keypoints"][name] for name in KP_STATS] == pytest.approx(expected.tolist(), abs=1e-9)
    assert 0.05 < metrics["keypoints"]["AP"] < 0.95  # genuinely between the extremes


def test_boxes_and_masks_beside_keypoints_do_not_change_the_keypoint_ap(gt):
    """A model's results carry bbox and segmentation too; the keypoint AP is that of the keypoints alone."""
    noisy = _noisy(gt, seed=1)
    with_boxes = [dict(r, bbox=[0.0, 0.0, 5.0, 5.0]) for r in noisy]
    metrics = coco_evaluate(gt, with_boxes, iou_types=("bbox", "keypoints"), verbose=False)
    expected = _direct(gt, noisy, "keypoints")[:5]
    assert [metrics["keypoints"][name] for name in KP_STATS] == pytest.approx(expected.tolist(), abs=1e-9)
    assert metrics["bbox"]["AP"] < 0.01


def test_keypoint_ap_is_chosen_only_with_keypoints_on_both_sides(gt, perfect):
    boxes = [dict(r, bbox=[0.0, 0.0, 5.0, 5.0], segmentation={"size": [4, 4], "counts": "04`0"}) for r in perfect]
    assert default_iou_types(gt, boxes) == ("bbox", "segm", "keypoints")
    assert default_iou_types(gt, [{k: v for k, v in r.items() if k != "keypoints"} for r in boxes]) == \
        ("bbox", "segm")
    assert default_iou_types(gt, []) == ("bbox", "segm")
    no_masks = [{k: v for k, v in r.items() if k != "segmentation"} for r in boxes]
    assert default_iou_types(gt, no_masks) == ("bbox", "keypoints")  # a box + keypoint model
    # neither masks nor keypoints: segm is asked for, and the missing masks are an error (test_evaluate.py)
    assert default_iou_types(gt, [{k: v for k, v in r.items() if k != "keypoints"} for r in no_masks]) == \
        ("bbox", "segm")


def test_a_box_and_keypoint_model_is_scored_without_segm(gt, perfect):
    """torchvision's Keypoint R-CNN has no mask branch: its results have boxes and keypoints only."""
    results = [dict(r, bbox=gt.anns[a]["bbox"]) for r, a in zip(perfect, _annotation_ids(gt))]
    metrics = coco_evaluate(gt, results, verbose=False)
    assert set(metrics) == {"bbox", "keypoints", "per_class"}
    assert metrics["keypoints"]["AP"] == pytest.approx(1.0, abs=1e-9)
    # the people without labelled keypoints are missed boxes
    assert metrics["bbox"]["AP"] == pytest.approx(_direct(gt, results, "bbox")[0], abs=1e-9)


def _annotation_ids(gt: COCO) -> list[int]:
    """The ids of the annotations `perfect` was made from, in its order."""
    return [a["id"] for a in gt.dataset["annotations"] if not a["iscrowd"] and a["num_keypoints"] > 0]
    with contextlib.redirect_stdout(io.StringIO()):
        instances = COCO(str(coco_mini() / "annotations" / "instances_val2017.json"))
    assert default_iou_types(instances, perfect) == ("bbox", "segm")
    with pytest.raises(MaskRCNNError, match="needs a ground truth with keypoints"):
        coco_evaluate(instances, perfect, iou_types=("keypoints",), verbose=False)


def test_bad_keypoint_results_give_clear_errors(gt, perfect):
    with pytest.raises(MaskRCNNError, match="needs 51 numbers .* of every result of category 1; got 50"):
        coco_evaluate(gt, [dict(perfect[0], keypoints=perfect[0]["keypoints"][:-1])], iou_types=("keypoints",),
                      verbose=False)
    with pytest.raises(MaskRCNNError, match="keypoints evaluation needs 'keypoints' in every result; 1 of 2"):
        coco_evaluate(gt, [perfect[0], {k: v for k, v in perfect[1].items() if k != "keypoints"}],
                      iou_types=("keypoints",), verbose=False)


def test_metrics_table_has_a_keypoints_row_without_small_objects():
    metrics = {"bbox": dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), (0.5, 0.6, 0.7, 0.1, 0.2, 0.3))),
               "keypoints": dict(zip(KP_STATS, (0.4123, 0.8, 0.45, 0.3, 0.5)))}
    lines = format_metrics_table(metrics).splitlines()
    assert lines[2].split() == ["keypoints", "41.2", "80.0", "45.0", "-", "30.0", "50.0"]
    assert lines[1].split()[0] == "bbox"


# ---- keypoints other than COCO's persons ----------------------------------------------------------------

def _toy_json() -> dict:
    """Two categories, one with 3 keypoints (not COCO's), one without; num_keypoints left out."""
    images = [{"id": i, "width": 100, "height": 80, "file_name": f"{i}.png"} for i in (1, 2)]
    people = [(1, [20, 20, 60, 70]), (1, [50, 10, 30, 40]), (2, [10, 10, 50, 50])]
    annotations = []
    rng = np.random.default_rng(3)
    for number, (image_id, (x, y, w, h)) in enumerate(people, start=1):
        points = [[x + w * fx, y + h * fy, int(v)] for fx, fy, v in zip(rng.random(3), rng.random(3), (2, 1, 2))]
        annotations.append({"id": number, "image_id": image_id, "category_id": 3, "bbox": [x, y, w, h],
                            "area": w * h * 0.6, "iscrowd": 0, "segmentation": [[x, y, x + w, y, x + w, y + h]],
                            "keypoints": [float(v) for p in points for v in p]})
    annotations.append({"id": 9, "image_id": 2, "category_id": 4, "bbox": [60, 40, 20, 20], "area": 400, "iscrowd": 0,
                        "segmentation": [[60, 40, 80, 40, 80, 60]]})
    categories = [{"id": 3, "name": "arrow", "keypoints": ["tip", "left_end", "right_end"], "skeleton": [[1, 2]]},
                  {"id": 4, "name": "ball"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def test_other_keypoints_use_the_mean_coco_sigma_and_skip_categories_without_keypoints(tmp_path):
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(_toy_json()))
    rng = np.random.default_rng(4)
    results = []
    for annotation in _toy_json()["annotations"][:3]:
        points = np.array(annotation["keypoints"]).reshape(3, 3)
        points[:, :2] += rng.normal(0, 3, (3, 2))
        results.append({"image_id": annotation["image_id"], "category_id": 3, "score": float(rng.random()),
                        "keypoints": points.ravel().tolist()})
    ball = {"image_id": 2, "category_id": 4, "score": 0.9, "bbox": [60, 40, 20, 20]}  # no keypoints: not scored
    metrics = coco_evaluate(path, results + [ball], iou_types=("keypoints",), verbose=False)

    data = _toy_json()
    for annotation in data["annotations"]:
        if "keypoints" in annotation:  # pycocotools needs num_keypoints, which the json leaves out
            annotation["num_keypoints"] = 3
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCO()
        reference.dataset = data
        reference.createIndex()
    coco_sigmas = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10
    expected = _direct(reference, results, "keypoints", cat_ids=[3], sigmas=np.full(3, coco_sigmas.mean()))[:5]
    assert [metrics["keypoints"][name] for name in KP_STATS] == pytest.approx(expected.tolist(), abs=1e-9)
    assert 0.05 < metrics["keypoints"]["AP"] < 0.95
    assert list(metrics["per_class"]["keypoints"]) == ["arrow"]


# ---- predict_dataset ------------------------------------------------------------------------------------

class _KeypointOracle(torch.nn.Module):
    """Returns the ground truth of each image (found by its size) with keypoints as (N, K, 3) or (N, K, 2)."""

    def __init__(self, data: dict, with_visibility: bool):
        super().__init__()
        self.data, self.with_visibility = data, with_visibility

    def forward(self, images):
        outputs = []
        for image in images:
            image_id = int(image[0, 0, 0])
            anns = [a for a in self.data["annotations"] if a["image_id"] == image_id and "keypoints" in a]
            boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
            keypoints = torch.tensor([a["keypoints"] for a in anns]).reshape(len(anns), 3, 3)
            outputs.append({"boxes": boxes, "labels": torch.ones(len(anns), dtype=torch.int64),
                            "scores": torch.full((len(anns),), 0.9),
                            "keypoints": keypoints if self.with_visibility else keypoints[..., :2]})
        return outputs


@pytest.mark.parametrize("with_visibility", [True, False])
def test_predict_dataset_carries_the_models_keypoints_into_the_results(tmp_path, with_visibility):
    data = _toy_json()
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(data))
    items = []
    for image_id in (1, 2):
        image = torch.zeros(3, 80, 100)
        image[0, 0, 0] = image_id
        items.append((image, {"image_id": image_id}))
    results = predict_dataset(_KeypointOracle(data, with_visibility), items, category_ids=[0, 3], progress=False)
    assert len(results) == 3 and all(len(r["keypoints"]) == 9 for r in results)
    if not with_visibility:
        assert {v for r in results for v in r["keypoints"][2::3]} == {1.0}
    metrics = coco_evaluate(path, results, iou_types=("bbox", "keypoints"), verbose=False)
    assert metrics["keypoints"]["AP"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["per_class"]["bbox"] == {"arrow": pytest.approx(1.0, abs=1e-9), "ball": 0.0}


def test_keypoints_of_the_wrong_shape_fail_their_image_with_one_line(tmp_path, capsys):
    class _Flat(_KeypointOracle):
        def forward(self, images):
            return [{**output, "keypoints": output["keypoints"].reshape(len(output["boxes"]), -1)}
                    for output in super().forward(images)]

    items = []
    for image_id in (1, 2):
        image = torch.zeros(3, 80, 100)
        image[0, 0, 0] = image_id
        items.append((image, {"image_id": image_id}))
    results = predict_dataset(_Flat(_toy_json(), True), items, category_ids=[0, 3], progress=False)
    assert list(results) == [] and results.failed_image_ids == [1, 2]
    assert all("ValueError: model returned keypoints of shape" in f.error and "expected (N, K, 3)" in f.error
               and "\n" not in f.error for f in results.failures)
