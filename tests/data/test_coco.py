"""CocoDataset on real COCO data (pycocotools as the reference) and on hand-made json files."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from conftest import coco_mini
from maskrcnn.data.augment import LargeScaleJitter
from maskrcnn.data.coco import CocoDataset, collate
from maskrcnn.errors import MaskRCNNError

# pycocotools' annToMask (our reference) trips a numpy-2 DeprecationWarning on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def mini():
    root = coco_mini()
    annotations = root / "annotations" / "instances_val2017.json"
    raw = json.loads(annotations.read_text())
    dataset = CocoDataset(annotations, root / "val2017")
    return dataset, raw, COCO(str(annotations))


def _index_of(dataset, image_id):
    return dataset.image_ids.index(image_id)


def test_label_mapping_follows_sorted_category_ids(mini):
    dataset, raw, _ = mini
    categories = sorted(raw["categories"], key=lambda c: c["id"])
    assert dataset.num_classes == len(categories) + 1 == 81
    assert dataset.category_ids == [0] + [c["id"] for c in categories]
    assert dataset.class_names == ["__background__"] + [c["name"] for c in categories]
    # COCO ids have gaps (1..90 for 80 classes), labels must not.
    assert dataset.category_ids[-1] == 90


def test_image_ids_and_aspect_ratios_come_from_json(mini):
    dataset, raw, _ = mini
    assert len(dataset) == len(raw["images"])
    assert dataset.image_ids == [image["id"] for image in raw["images"]]
    assert dataset.aspect_ratios == pytest.approx([image["width"] / image["height"] for image in raw["images"]])
    assert dataset.check_files() == []


def test_crowd_regions_are_not_targets(mini):
    dataset, raw, _ = mini
    crowd = [a for a in raw["annotations"] if a["iscrowd"]]
    assert crowd, "coco-mini is expected to contain crowd annotations"
    assert dataset.skipped["crowd"] == len(crowd)
    for image_id in sorted({a["image_id"] for a in crowd})[:2]:
        _, target = dataset[_index_of(dataset, image_id)]
        expected = [a for a in raw["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        assert len(target["labels"]) == len(expected)


def test_targets_match_json_and_pycocotools(mini):
    dataset, raw, reference = mini
    sorted_ids = sorted(c["id"] for c in raw["categories"])
    crowd_images = sorted({a["image_id"] for a in raw["annotations"] if a["iscrowd"]})
    for image_id in [raw["images"][0]["id"], crowd_images[0]]:
        image, target = dataset[_index_of(dataset, image_id)]
        info = reference.imgs[image_id]
        height, width = info["height"], info["width"]
        annotations = [a for a in raw["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]

        expected_boxes = torch.tensor([[x, y, min(x + w, width), min(y + h, height)]
                                       for x, y, w, h in (a["bbox"] for a in annotations)], dtype=torch.float32)
        assert target["boxes"].dtype == torch.float32
        assert torch.allclose(target["boxes"], expected_boxes)
        expected_labels = [sorted_ids.index(a["category_id"]) + 1 for a in annotations]
        assert target["labels"].dtype == torch.int64
        assert target["labels"].tolist() == expected_labels

        assert target["masks"].dtype == torch.uint8
        assert target["masks"].shape == (len(annotations), height, width)
        for mask, annotation in zip(target["masks"], annotations):
            np.testing.assert_array_equal(mask.numpy(), reference.annToMask(annotation))

        with Image.open(dataset.images_dir / info["file_name"]) as pil:
            expected_image = torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1).float() / 255
        assert image.dtype == torch.float32
        assert torch.allclose(image, expected_image)
        assert target["image_id"] == image_id
        assert target["file_name"] == info["file_name"]


def test_collate_keeps_lists(mini):
    dataset, _, _ = mini
    batch = [dataset[0], dataset[1]]
    images, targets = collate(batch)
    assert isinstance(images, list) and isinstance(targets, list)
    assert images[1] is batch[1][0] and targets[0] is batch[0][1]


def test_transforms_are_applied(mini):
    dataset, _, _ = mini
    calls = []

    def halve_brightness(image, target):
        calls.append(target["image_id"])
        return image * 0.5, target

    transformed = CocoDataset(dataset.annotations_path, dataset.images_dir, transforms=halve_brightness)
    image, _ = transformed[3]
    assert calls == [dataset.image_ids[3]]
    assert torch.allclose(image, dataset[3][0] * 0.5)


# ---- hand-made files -------------------------------------------------------------------------------------

# A 4 wide x 3 high image; the instance covers row 1, columns 1 and 2.
TINY_MASK = np.zeros((3, 4), dtype=np.uint8)
TINY_MASK[1, 1:3] = 1
# Column-major run lengths of TINY_MASK: flat (Fortran) indices 4 and 7 are set.
TINY_MASK_COUNTS = [4, 1, 2, 1, 4]


def _base_json() -> dict:
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 3},
                   {"id": 2, "file_name": "b.png", "width": 4, "height": 3}],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [1, 1, 2, 1], "iscrowd": 0,
             "segmentation": {"size": [3, 4], "counts": TINY_MASK_COUNTS}},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [0, 0, 4, 3], "iscrowd": 0,
             "segmentation": [[0, 0, 4, 0, 4, 3, 0, 3]]},
        ],
    }


def _write(tmp_path, data, name="instances.json", images=True):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    if images:
        for image in data.get("images", []):
            Image.fromarray(np.zeros((image["height"], image["width"], 3), dtype=np.uint8)).save(
                tmp_path / image["file_name"])
    return path


def test_hand_made_rle_and_polygon_and_image_without_annotations(tmp_path):
    path = _write(tmp_path, _base_json())
    dataset = CocoDataset(path, tmp_path)
    assert dataset.class_names == ["__background__", "cat", "dog"]
    assert dataset.category_ids == [0, 3, 7]

    image, target = dataset[0]
    assert image.shape == (3, 3, 4)
    assert target["labels"].tolist() == [2, 1]
    assert target["boxes"].tolist() == [[1, 1, 3, 2], [0, 0, 4, 3]]
    np.testing.assert_array_equal(target["masks"][0].numpy(), TINY_MASK)
    assert target["masks"][1].numpy().all()  # the polygon covers the whole image

    _, empty = dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["boxes"].dtype == torch.float32
    assert empty["labels"].shape == (0,) and empty["labels"].dtype == torch.int64
    assert empty["masks"].shape == (0, 3, 4) and empty["masks"].dtype == torch.uint8


def test_compressed_rle_string(tmp_path):
    data = _base_json()
    compressed = mask_utils.encode(np.asfortranarray(TINY_MASK))
    data["annotations"][0]["segmentation"] = {"size": [3, 4], "counts": compressed["counts"].decode("ascii")}
    _, target = CocoDataset(_write(tmp_path, data), tmp_path)[0]
    np.testing.assert_array_equal(target["masks"][0].numpy(), TINY_MASK)


def test_degenerate_and_empty_instances_warn_once_at_construction(tmp_path):
    data = _base_json()
    data["annotations"] += [
        {"id": 12, "image_id": 1, "category_id": 3, "bbox": [1, 1, 0.5, 2], "segmentation": [[1, 1, 1.5, 1, 1.5, 3]]},
        {"id": 13, "image_id": 1, "category_id": 3, "bbox": [0, 0, 2, 2], "segmentation": []},
        {"id": 14, "image_id": 1, "category_id": 3, "bbox": [0, 0, 2, 2],
         "segmentation": {"size": [3, 4], "counts": [12]}},
        {"id": 15, "image_id": 2, "category_id": 3, "bbox": [0, 0, 2, 2], "iscrowd": 1,
         "segmentation": {"size": [3, 4], "counts": [0, 12]}},
    ]
    path = _write(tmp_path, data)
    with pytest.warns(UserWarning, match=r"instances\.json: left out 3 annotations \(1 with a box under 1 px, 2 "
                                         r"with an empty mask\)"):
        dataset = CocoDataset(path, tmp_path)
    assert dataset.skipped == {"crowd": 1, "degenerate_box": 1, "empty_mask": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, target = dataset[0]
        _, crowd_only = dataset[1]
    assert target["labels"].tolist() == [2, 1]
    assert len(crowd_only["labels"]) == 0
    # Evaluation still sees every annotation, including the left-out ones.
    assert sorted(dataset.coco.anns) == [10, 11, 12, 13, 14, 15]


def test_clean_dataset_does_not_warn(tmp_path):
    path = _write(tmp_path, _base_json())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CocoDataset(path, tmp_path)


def test_missing_iscrowd_and_area_are_filled_for_evaluation(tmp_path):
    data = _base_json()
    del data["annotations"][0]["iscrowd"]
    dataset = CocoDataset(_write(tmp_path, data), tmp_path)
    annotation = dataset.coco.anns[10]
    assert annotation["iscrowd"] == 0
    assert annotation["area"] == 2  # two pixels in TINY_MASK


def _mutated(change):
    data = _base_json()
    change(data)
    return data


def _set(path, value):
    def change(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


def _delete(path):
    def change(data):
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return change


ERROR_CASES = {
    "missing images key": (_delete(["images"]), r"instances\.json: missing top-level key 'images'"),
    "missing annotations key": (_delete(["annotations"]), r"instances\.json: missing top-level key 'annotations'"),
    "missing categories key": (_delete(["categories"]), r"instances\.json: missing top-level key 'categories'"),
    "no images": (_set(["images"], []), r"instances\.json: no images"),
    "no segmentation": (_delete(["annotations", 1, "segmentation"]),
                        r"instances\.json: annotation 11: missing field 'segmentation'"),
    "no bbox": (_delete(["annotations", 0, "bbox"]), r"instances\.json: annotation 10: missing field 'bbox'"),
    "no image_id": (_delete(["annotations", 0, "image_id"]),
                    r"instances\.json: annotation 10: missing field 'image_id'"),
    "no category_id": (_delete(["annotations", 1, "category_id"]),
                       r"instances\.json: annotation 11: missing field 'category_id'"),
    "short bbox": (_set(["annotations", 0, "bbox"], [1, 1, 2]), r"instances\.json: annotation 10: 'bbox' must be 4"),
    "text bbox": (_set(["annotations", 0, "bbox"], [1, 1, "2", 1]),
                  r"instances\.json: annotation 10: 'bbox' must be 4"),
    "unknown category": (_set(["annotations", 1, "category_id"], 99),
                         r"instances\.json: annotation 11 has category_id 99 which is not in 'categories'"),
    "unknown image": (_set(["annotations", 1, "image_id"], 42),
                      r"instances\.json: annotation 11 has image_id 42 which is not in 'images'"),
    "rle size mismatch": (_set(["annotations", 0, "segmentation", "size"], [4, 3]),
                          r"instances\.json: annotation 10: RLE size \[4, 3\] does not match image 1"),
    "odd polygon": (_set(["annotations", 1, "segmentation"], [[0, 0, 4, 0, 4]]),
                    r"instances\.json: annotation 11: 'segmentation' polygons"),
    "segmentation wrong type": (_set(["annotations", 1, "segmentation"], "oops"),
                                r"instances\.json: annotation 11: 'segmentation' must be"),
    "duplicate annotation id": (_set(["annotations", 1, "id"], 10), r"instances\.json: annotation id 10 appears twice"),
    "image without width": (_delete(["images", 1, "width"]), r"instances\.json: image 2: missing field 'width'"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_bad_json_raises_clear_error(tmp_path, case):
    change, message = ERROR_CASES[case]
    data = _mutated(change)
    path = _write(tmp_path, data, images=False)
    with pytest.raises(MaskRCNNError, match=message):
        CocoDataset(path, tmp_path)


def test_not_json_and_missing_file(tmp_path):
    path = tmp_path / "instances.json"
    path.write_text('{"images": [')
    with pytest.raises(MaskRCNNError, match=r"instances\.json: not valid JSON"):
        CocoDataset(path, tmp_path)
    with pytest.raises(MaskRCNNError, match=r"absent\.json: annotation file not found"):
        CocoDataset(tmp_path / "absent.json", tmp_path)


def test_missing_image_file_is_reported(tmp_path):
    path = _write(tmp_path, _base_json())
    (tmp_path / "b.png").unlink()
    # Since the up-front checks (data/validate.py) a missing file stops the opening, not the first read.
    with pytest.raises(MaskRCNNError, match=r"b\.png: image file not found \(referenced by image id 2"):
        CocoDataset(path, tmp_path)
    # A file deleted after the opening is still named when it is read.
    _write(tmp_path, _base_json())
    dataset = CocoDataset(path, tmp_path)
    (tmp_path / "b.png").unlink()
    assert dataset.check_files() == [tmp_path / "b.png"]
    dataset[0]
    with pytest.raises(MaskRCNNError, match=r"b\.png: image file not found \(referenced by image id 2"):
        dataset[1]


def test_image_size_disagreeing_with_json_is_reported(tmp_path):
    path = _write(tmp_path, _base_json())
    Image.fromarray(np.zeros((4, 3, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(MaskRCNNError, match=r"a\.png: image is 3x4 pixels .* says 4x3 \(image id 1\)"):
        CocoDataset(path, tmp_path)[0]


def test_augment_seed_makes_items_reproducible(mini):
    dataset, _, _ = mini

    def make():
        return CocoDataset(dataset.annotations_path, dataset.images_dir,
                           transforms=LargeScaleJitter(64, (0.5, 1.5)), augment_seed=5)

    first, second = make(), make()
    image_a, target_a = first[2]
    image_b, target_b = second[2]
    assert torch.equal(image_a, image_b) and torch.equal(target_a["boxes"], target_b["boxes"])
    second.set_epoch(1)
    image_c, _ = second[2]
    assert not torch.equal(image_a, image_c)


def test_input_json_is_not_modified_on_disk(tmp_path):
    data = _base_json()
    del data["annotations"][0]["iscrowd"]
    path = _write(tmp_path, data)
    before = path.read_text()
    CocoDataset(path, tmp_path)
    assert path.read_text() == before
