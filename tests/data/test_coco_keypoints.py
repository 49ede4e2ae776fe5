"""COCO keypoint targets (CocoDataset on person_keypoints json) and the up-front checks of the keypoint fields
(maskrcnn/data/validate_keypoints.py): one message per problem, all in one error, --skip-invalid, and a
property test (hypothesis) that mutated keypoint datasets never crash."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from coco_fuzz import base_json, check_example, write_images
from conftest import coco_mini
from maskrcnn.data.coco import CocoDataset
from maskrcnn.errors import MaskRCNNError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def test_person_keypoints_targets_are_the_json_keypoints_of_the_kept_instances():
    root = coco_mini()
    path = root / "annotations" / "person_keypoints_train2017.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dataset = CocoDataset(path, root / "train2017")
    data = json.loads(path.read_text())
    category = data["categories"][0]
    assert dataset.keypoint_names == category["keypoints"] and len(dataset.keypoint_names) == 17
    assert dataset.skeleton == category["skeleton"] and dataset.skeleton[0] == [16, 14]  # 1-based, as COCO's
    checked = 0
    for index, image_id in enumerate(dataset.image_ids):
        annotations = [a for a in data["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        _, target = dataset[index]
        assert target["keypoints"].dtype.is_floating_point and target["keypoints"].shape == (len(annotations), 17, 3)
        for row, annotation in enumerate(annotations):
            x, y, w, h = annotation["bbox"]
            assert target["boxes"][row].tolist() == pytest.approx([x, y, min(x + w, 10 ** 4), y + h], abs=1e-3)
            expected = np.array(annotation["keypoints"], dtype=np.float32).reshape(17, 3)
            np.testing.assert_array_equal(target["keypoints"][row].numpy(), expected)
            checked += 1
    assert checked == 18  # 19 annotations in the file, one of them crowd (left out with its keypoints)


def test_an_empty_keypoint_list_is_a_category_without_keypoints(tmp_path):
    def change(data):
        data["categories"][1]["keypoints"] = []
    folder = _folder(tmp_path, change)
    assert CocoDataset(folder / "instances.json", folder).keypoint_names == ["nose", "left_ear", "right_ear"]


def test_instances_json_has_no_keypoint_target():
    root = coco_mini()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dataset = CocoDataset(root / "annotations" / "instances_val2017.json", root / "val2017")
    assert dataset.keypoint_names == [] and dataset.skeleton == []
    assert "keypoints" not in dataset[0][1]


def _folder(tmp_path: Path, change=None, name: str = "set") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    write_images(folder)
    data = base_json(keypoints=True)
    if change is not None:
        change(data)
    (folder / "instances.json").write_text(json.dumps(data))
    return folder


def _error(folder: Path) -> str:
    with pytest.raises(MaskRCNNError) as raised:
        CocoDataset(folder / "instances.json", folder)
    return str(raised.value)


def test_keypoints_of_a_mixed_dataset_fill_in_num_keypoints_and_zero_other_categories(tmp_path):
    def change(data):
        data["annotations"][2]["keypoints"][6:9] = [7, 1, 0]  # unlabelled, yet not at (0, 0)
    folder = _folder(tmp_path, change)
    dataset = CocoDataset(folder / "instances.json", folder)
    assert dataset.keypoint_names == ["nose", "left_ear", "right_ear"] and dataset.skeleton == [[1, 2], [1, 3]]
    _, first = dataset[0]
    assert first["labels"].tolist() == [1, 2]
    assert first["keypoints"].tolist() == [[[3, 2, 2], [2, 1, 1], [0, 0, 0]], [[0, 0, 0]] * 3]  # dog: none
    _, second = dataset[1]
    assert second["keypoints"].tolist() == [[[5, 3, 2], [4, 2, 2], [0, 0, 0]]]
    assert dataset.coco.anns[3]["num_keypoints"] == 2  # filled in: pycocotools needs it


def _set_annotation(index, **fields):
    def change(data):
        data["annotations"][index].update(fields)
    return change


KEYPOINT_CASES = {
    "too few numbers": (_set_annotation(0, keypoints=[3, 2, 2, 2, 1, 1]),
                        "annotation 1: 'keypoints' must be 9 numbers (x, y, v for each of the 3 keypoints of "
                        "category 1), got 6 numbers"),
    "not a list": (_set_annotation(0, keypoints="3 2 2"), "annotation 1: 'keypoints' must be 9 numbers (x, y, v for "
                                                          "each of the 3 keypoints of category 1), got '3 2 2'"),
    "nan": (_set_annotation(2, keypoints=[5, float("nan"), 2, 4, 2, 2, 6, 2, 2]),
            "annotation 3: 'keypoints' has nan, not a finite number"),
    "string": (_set_annotation(2, keypoints=[5, 3, 2, "4", 2, 2, 6, 2, 2]),
               "annotation 3: 'keypoints' has '4', not a finite number"),
    "visibility 3": (_set_annotation(2, keypoints=[5, 3, 2, 4, 2, 3, 6, 2, 2]),
                     "annotation 3: 'keypoints' visibility of keypoint 2 must be 0, 1 or 2, got 3"),
    "far outside": (_set_annotation(2, keypoints=[5, 3, 2, 4, 2, 2, 21, 2, 2]),
                    "annotation 3: 'keypoints' has keypoint 3 at (21, 2), more than an image size outside the 10x7 "
                    "image"),
    "num_keypoints wrong": (_set_annotation(0, num_keypoints=3),
                            "annotation 1: 'num_keypoints' is 3 but 2 keypoints are labelled (v > 0)"),
    "missing": (lambda data: data["annotations"][2].pop("keypoints"),
                "annotation 3: missing field 'keypoints' (category 1 has 3 keypoints)"),
    "on a category without": (_set_annotation(1, keypoints=[1, 1, 2]),
                              "annotation 2: has 'keypoints' but category 5 defines none"),
    "names not strings": (lambda data: data["categories"][0].update(keypoints=["nose", 3]),
                          "category 1: 'keypoints' must be a non-empty list of keypoint names, got ['nose', 3]"),
    "name twice": (lambda data: data["categories"][0].update(keypoints=["nose", "nose", "tail"]),
                   "category 1: 'keypoints' names 'nose' twice"),
    "skeleton out of range": (lambda data: data["categories"][0].update(skeleton=[[1, 2], [0, 3]]),
                              "category 1: 'skeleton' must be a list of [a, b] keypoint numbers from 1 to 3, "
                              "has [0, 3]"),
    "two keypoint sets": (lambda data: data["categories"][1].update(keypoints=["tail"]),
                          "category 5: 'keypoints' differ from those of category 1 (one model predicts one set of "
                          "keypoints for every class)"),
}


@pytest.mark.parametrize("case", KEYPOINT_CASES)
def test_keypoint_problems_are_named_up_front(tmp_path, case):
    change, expected = KEYPOINT_CASES[case]
    folder = _folder(tmp_path, change)
    lines = [line.strip() for line in _error(folder).splitlines()]
    assert f"{folder / 'instances.json'}: {expected}" in lines, lines


def test_keypoint_problems_come_together_and_skip_invalid_leaves_them_out(tmp_path):
    def change(data):
        data["annotations"][0]["keypoints"][2] = 7
        data["annotations"][2]["num_keypoints"] = 1
    folder = _folder(tmp_path, change)
    source = folder / "instances.json"
    assert _error(folder).splitlines() == [
        f"{source}: 2 problems in the annotations and images (fix them, or pass --skip-invalid / skip_invalid=True "
        f"to leave out the entries that have them):",
        f"  {source}: annotation 1: 'keypoints' visibility of keypoint 1 must be 0, 1 or 2, got 7",
        f"  {source}: annotation 3: 'num_keypoints' is 1 but 3 keypoints are labelled (v > 0)"]
    with pytest.warns(UserWarning, match=r"skipped 0 images and 2 annotations with problems"):
        dataset = CocoDataset(source, folder, skip_invalid=True)
    _, first = dataset[0]
    assert first["labels"].tolist() == [2] and first["keypoints"].shape == (1, 3, 3)
    assert dataset[1][1]["keypoints"].shape == (0, 3, 3)


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_malformed_keypoints_never_crash_opening_reading_flipping_or_evaluating(data):
    """coco_fuzz's property (a MaskRCNNError naming the json, or a clean skip; whatever opens is read, flipped
    and evaluated, keypoints included) on the keypoint dataset, with the keypoint fields mutated most often.
    In-process: keypoints go to no rasterizer, so nothing here can take unbounded memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check_example(data.draw, keypoints=True)
