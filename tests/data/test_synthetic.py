"""The synthetic shapes dataset is valid COCO, self-consistent and reproducible from its seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.synthetic import CLASS_NAMES, MIN_VISIBLE_PIXELS, make_shapes

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SIZE = 96


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    summary = make_shapes(root, num_train=16, num_val=4, size=SIZE, seed=3, progress=False)
    return root, summary


def test_files_exist_and_summary_counts_them(shapes):
    root, summary = shapes
    for split, count in (("train", 16), ("val", 4)):
        annotations = root / "annotations" / f"instances_{split}.json"
        assert summary[f"{split}_annotations"] == str(annotations) and annotations.is_file()
        data = json.loads(annotations.read_text())
        assert summary[f"num_{split}_images"] == len(data["images"]) == count
        assert summary[f"num_{split}_instances"] == len(data["annotations"])
        for image in data["images"]:
            with Image.open(root / split / image["file_name"]) as pil:
                assert pil.size == (image["width"], image["height"])
            assert min(image["width"], image["height"]) == SIZE
            assert max(image["width"], image["height"]) <= round(SIZE * 1.33)
        assert [c["name"] for c in data["categories"]] == list(CLASS_NAMES)


def test_masks_agree_with_boxes_areas_and_each_other(shapes):
    _, summary = shapes
    coco = COCO(summary["train_annotations"])
    kinds = set()
    for image_id, image in coco.imgs.items():
        annotations = coco.imgToAnns[image_id]
        coverage = np.zeros((image["height"], image["width"]), dtype=int)
        for annotation in annotations:
            kinds.add(type(annotation["segmentation"]).__name__)
            mask = coco.annToMask(annotation)
            ys, xs = np.nonzero(mask)
            assert len(xs) >= MIN_VISIBLE_PIXELS
            assert annotation["area"] == len(xs)
            assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert annotation["iscrowd"] == 0
            coverage += mask
        # Masks are the visible parts, so two objects never claim the same pixel.
        assert coverage.max() <= 1
    assert kinds == {"list", "dict"}, "both polygons and RLE should be written"


def test_objects_per_image_and_classes(shapes):
    _, summary = shapes
    with open(summary["train_annotations"]) as file:
        data = json.load(file)
    per_image = [sum(a["image_id"] == image["id"] for a in data["annotations"]) for image in data["images"]]
    assert all(count == 0 or 2 <= count <= 8 for count in per_image)
    assert sum(per_image) / len(per_image) > 2
    assert len({a["category_id"] for a in data["annotations"]}) >= 4
    sides = [max(a["bbox"][2], a["bbox"][3]) / SIZE for a in data["annotations"]]
    assert min(sides) < 0.2 and max(sides) > 0.3


def test_coco_dataset_reads_it(shapes):
    root, summary = shapes
    dataset = CocoDataset(summary["val_annotations"], root / "val")
    assert dataset.num_classes == len(CLASS_NAMES) + 1
    assert dataset.class_names[1:] == list(CLASS_NAMES)
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.shape[1:] == target["masks"].shape[1:]
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_objects_are_visible_in_the_pixels(shapes):
    root, summary = shapes
    dataset = CocoDataset(summary["train_annotations"], root / "train")
    contrasts = []
    for index in range(len(dataset)):
        image, target = dataset[index]
        for mask in target["masks"].bool():
            inside = image[:, mask].mean(dim=1)
            ring = torch.nn.functional.max_pool2d(mask[None, None].float(), 5, 1, 2)[0, 0].bool() & ~mask
            if ring.any():
                contrasts.append((inside - image[:, ring].mean(dim=1)).abs().max().item())
    # Random colours: most objects stand out from their surroundings, a few are hard on purpose.
    assert np.median(contrasts) > 0.1


def test_same_seed_same_json_and_different_seed_differs(tmp_path):
    make_shapes(tmp_path / "a", num_train=3, num_val=1, size=64, seed=7, progress=False)
    make_shapes(tmp_path / "b", num_train=3, num_val=1, size=64, seed=7, progress=False)
    make_shapes(tmp_path / "c", num_train=3, num_val=1, size=64, seed=8, progress=False)
    read = lambda name: (tmp_path / name / "annotations" / "instances_train.json").read_bytes()
    assert read("a") == read("b")
    assert read("a") != read("c")
    assert (tmp_path / "a" / "train" / "000001.jpg").read_bytes() == (tmp_path / "b" / "train" / "000001.jpg").read_bytes()


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_shapes("unused", num_train=0)
    with pytest.raises(ValueError):
        make_shapes("unused", size=8)
