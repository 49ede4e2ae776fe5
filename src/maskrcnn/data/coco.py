"""COCO-format instance segmentation dataset.

The json is checked up front so a broken annotation file fails in the first second with a message
naming the file, the annotation and the field, not an hour into training with a KeyError.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from maskrcnn.data.augment import seeded_generator
from maskrcnn.data.images import read_image, to_float_tensor
from maskrcnn.errors import MaskRCNNError

_TOP_LEVEL_KEYS = ("images", "annotations", "categories")
_IMAGE_FIELDS = ("id", "file_name", "width", "height")
_ANNOTATION_FIELDS = ("image_id", "category_id", "bbox", "segmentation")


@dataclass
class _ImageInstances:
    """The usable (non-crowd, non-degenerate) instances of one image, decided once at construction."""

    annotation_ids: list[int]
    boxes: np.ndarray  # (N, 4) float32 xyxy, clipped to the image
    labels: np.ndarray  # (N,) int64, contiguous 1..K


class CocoDataset(Dataset):
    """Images and instance targets from a COCO json, for training and evaluation.

    Each item is `(image, target)`: image a (3,H,W) float32 tensor in [0,1]; target a dict with
    `boxes` (N,4) float32 xyxy pixels, `labels` (N,) int64 in 1..K, `masks` (N,H,W) uint8,
    `image_id` int and `file_name` str.

    Crowd regions, boxes under 1 px and empty masks are not training positives, so they are left out
    of targets (one summary warning per dataset). `coco` keeps the full json for COCO evaluation;
    missing `iscrowd`/`area` fields are filled in there so COCOeval accepts hand-made files.

    `transforms` is called as `transforms(image, target)`. With `augment_seed` set it is called as
    `transforms(image, target, generator=g)` where g is seeded from (augment_seed, epoch, index), so
    augmentation is reproducible and independent of DataLoader worker count; call `set_epoch` each
    epoch (works with non-persistent workers, which receive a fresh copy of the dataset per epoch).
    """

    def __init__(self, annotations: str | Path, images: str | Path, transforms=None,
                 augment_seed: int | None = None):
        self.annotations_path = Path(annotations)
        self.images_dir = Path(images)
        self.transforms = transforms
        self.augment_seed = augment_seed
        self.epoch = 0
        self._source = str(annotations)

        data = _load_json(self.annotations_path)
        _validate(data, self._source)

        categories = sorted(data["categories"], key=lambda category: category["id"])
        self.category_ids: list[int] = [0] + [category["id"] for category in categories]
        self.class_names: list[str] = ["__background__"] + [str(category.get("name", category["id"]))
                                                            for category in categories]
        self.num_classes = len(self.category_ids)
        self._label_of_category = {category_id: label for label, category_id in enumerate(self.category_ids)
                                   if label > 0}

        self.image_ids: list[int] = [image["id"] for image in data["images"]]
        self.aspect_ratios: list[float] = [image["width"] / image["height"] for image in data["images"]]
        self._instances, self.skipped = self._select_instances(data)
        self.coco = _build_coco(data)

        dropped = self.skipped["degenerate_box"] + self.skipped["empty_mask"]
        if dropped:
            warnings.warn(f"{self._source}: left out {dropped} annotations "
                          f"({self.skipped['degenerate_box']} with a box under 1 px, "
                          f"{self.skipped['empty_mask']} with an empty mask)", stacklevel=2)

    def _select_instances(self, data: dict) -> tuple[list[_ImageInstances], dict[str, int]]:
        images_by_id = {image["id"]: image for image in data["images"]}
        per_image: dict[int, list[tuple[int, list[float], int]]] = {image_id: [] for image_id in self.image_ids}
        skipped = {"crowd": 0, "degenerate_box": 0, "empty_mask": 0}
        for annotation in data["annotations"]:
            image = images_by_id[annotation["image_id"]]
            width, height = image["width"], image["height"]
            if "area" not in annotation:
                annotation["area"] = float(mask_utils.area(self._rle(annotation, height, width)))
            if annotation.setdefault("iscrowd", 0):
                skipped["crowd"] += 1
                continue
            x, y, w, h = annotation["bbox"]
            box = [min(max(x, 0.0), width), min(max(y, 0.0), height),
                   min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)]
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                skipped["degenerate_box"] += 1
                continue
            if mask_utils.area(self._rle(annotation, height, width)) == 0:
                skipped["empty_mask"] += 1
                continue
            label = self._label_of_category[annotation["category_id"]]
            per_image[annotation["image_id"]].append((annotation["id"], box, label))

        instances = []
        for image_id in self.image_ids:
            rows = per_image[image_id]
            instances.append(_ImageInstances(
                annotation_ids=[row[0] for row in rows],
                boxes=np.array([row[1] for row in rows], dtype=np.float32).reshape(-1, 4),
                labels=np.array([row[2] for row in rows], dtype=np.int64),
            ))
        return instances, skipped

    def _rle(self, annotation: dict, height: int, width: int) -> dict:
        try:
            return segmentation_to_rle(annotation["segmentation"], height, width)
        except (TypeError, ValueError, KeyError, IndexError, OverflowError) as error:
            raise MaskRCNNError(f"{self._source}: annotation {annotation['id']}: "
                                f"invalid 'segmentation': {error}") from None

    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream for this epoch (only matters with `augment_seed`)."""
        self.epoch = epoch

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.coco.imgs[self.image_ids[index]]["file_name"]

    def check_files(self) -> list[Path]:
        """Image files the json refers to that are missing, so a run can fail before training starts."""
        return [self.image_path(index) for index in range(len(self)) if not self.image_path(index).is_file()]

    def __getitem__(self, index: int):
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_path(index)
        if not path.is_file():
            raise MaskRCNNError(f"{path}: image file not found (referenced by image id {image_id} in {self._source})")
        pixels = read_image(path)
        height, width = pixels.shape[:2]
        if (width, height) != (info["width"], info["height"]):
            raise MaskRCNNError(f"{path}: image is {width}x{height} pixels (after EXIF rotation) but "
                                f"{self._source} says {info['width']}x{info['height']} (image id {image_id})")
        image = to_float_tensor(pixels)

        instances = self._instances[index]
        masks = decode_rles([self._rle(self.coco.anns[annotation_id], height, width)
                             for annotation_id in instances.annotation_ids], height, width)
        target = {
            "boxes": torch.from_numpy(instances.boxes.copy()),
            "labels": torch.from_numpy(instances.labels.copy()),
            "masks": torch.from_numpy(masks),
            "image_id": int(image_id),
            "file_name": str(info["file_name"]),
        }
        if self.transforms is not None:
            if self.augment_seed is None:
                image, target = self.transforms(image, target)
            else:
                generator = seeded_generator(self.augment_seed, self.epoch, index)
                image, target = self.transforms(image, target, generator=generator)
        return image, target


def collate(batch):
    """Keep images as a list: they differ in size until the model pads them."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


def decode_rles(rles: list[dict], height: int, width: int) -> np.ndarray:
    """Decode RLEs to an (N,H,W) uint8 array, without pycocotools' numpy-2 DeprecationWarning per call."""
    if not rles:
        return np.zeros((0, height, width), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        stacked = mask_utils.decode(rles)  # (H, W, N), Fortran order
    return np.ascontiguousarray(stacked.transpose(2, 0, 1))


def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """One compressed RLE for a COCO segmentation (polygons, uncompressed or compressed RLE).

    Polygons with fewer than 3 points cover nothing and are ignored (pycocotools would otherwise read a
    4-number polygon as a box).
    """
    if isinstance(segmentation, list):
        polygons = [polygon for polygon in segmentation if len(polygon) >= 6]
        if not polygons:
            return mask_utils.encode(np.zeros((height, width, 1), dtype=np.uint8, order="F"))[0]
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {"size": list(segmentation["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        raise MaskRCNNError(f"{path}: annotation file not found") from None
    except json.JSONDecodeError as error:
        raise MaskRCNNError(f"{path}: not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except UnicodeDecodeError:
        raise MaskRCNNError(f"{path}: not valid JSON: not UTF-8 text") from None
    except OSError as error:
        raise MaskRCNNError(f"{path}: cannot read annotation file: {error.strerror or error}") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _validate(data, source: str) -> None:
    """Check the structure the dataset relies on; pixel-level checks happen when masks are rasterized."""
    if not isinstance(data, dict):
        raise MaskRCNNError(f"{source}: top level must be a JSON object with 'images', 'annotations', 'categories'")
    for key in _TOP_LEVEL_KEYS:
        if key not in data:
            raise MaskRCNNError(f"{source}: missing top-level key '{key}'")
        if not isinstance(data[key], list):
            raise MaskRCNNError(f"{source}: '{key}' must be a list")
    if not data["images"]:
        raise MaskRCNNError(f"{source}: no images")
    if not data["categories"]:
        raise MaskRCNNError(f"{source}: no categories")

    category_ids = set()
    for index, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or "id" not in category:
            raise MaskRCNNError(f"{source}: category at index {index}: missing field 'id'")
        if category["id"] in category_ids:
            raise MaskRCNNError(f"{source}: category id {category['id']} appears twice")
        category_ids.add(category["id"])

    images = {}
    for index, image in enumerate(data["images"]):
        name = f"image {image['id']}" if isinstance(image, dict) and "id" in image else f"image at index {index}"
        if not isinstance(image, dict):
            raise MaskRCNNError(f"{source}: {name}: must be a JSON object")
        for field in _IMAGE_FIELDS:
            if field not in image:
                raise MaskRCNNError(f"{source}: {name}: missing field '{field}'")
        for field in ("width", "height"):
            if not _is_positive_int(image[field]):
                raise MaskRCNNError(f"{source}: {name}: '{field}' must be a positive integer, got {image[field]!r}")
        if image["id"] in images:
            raise MaskRCNNError(f"{source}: image id {image['id']} appears twice")
        images[image["id"]] = image

    annotation_ids = set()
    for index, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict):
            raise MaskRCNNError(f"{source}: annotation at index {index}: must be a JSON object")
        if "id" not in annotation:
            raise MaskRCNNError(f"{source}: annotation at index {index}: missing field 'id'")
        name = f"annotation {annotation['id']}"
        if annotation["id"] in annotation_ids:
            raise MaskRCNNError(f"{source}: annotation id {annotation['id']} appears twice")
        annotation_ids.add(annotation["id"])
        for field in _ANNOTATION_FIELDS:
            if field not in annotation:
                raise MaskRCNNError(f"{source}: {name}: missing field '{field}'")
        bbox = annotation["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise MaskRCNNError(f"{source}: {name}: 'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}")
        if annotation["category_id"] not in category_ids:
            raise MaskRCNNError(f"{source}: {name} has category_id {annotation['category_id']!r} "
                                f"which is not in 'categories'")
        image = images.get(annotation["image_id"])
        if image is None:
            raise MaskRCNNError(f"{source}: {name} has image_id {annotation['image_id']!r} which is not in 'images'")
        _validate_segmentation(annotation["segmentation"], image, f"{source}: {name}")


def _validate_segmentation(segmentation, image: dict, where: str) -> None:
    if isinstance(segmentation, list):
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) % 2:
                raise MaskRCNNError(f"{where}: 'segmentation' polygons must be flat lists of x, y pairs")
        return
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise MaskRCNNError(f"{where}: RLE 'segmentation' needs 'counts' and 'size'")
        if not isinstance(segmentation["size"], list) or segmentation["size"] != [image["height"], image["width"]]:
            raise MaskRCNNError(f"{where}: RLE size {segmentation['size']} does not match image "
                                f"{image['id']} height x width [{image['height']}, {image['width']}]")
        if not isinstance(segmentation["counts"], (str, list)):
            raise MaskRCNNError(f"{where}: RLE 'counts' must be a string or a list of run lengths")
        return
    raise MaskRCNNError(f"{where}: 'segmentation' must be a list of polygons or an RLE object")


def _build_coco(data: dict) -> COCO:
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco.createIndex()
    return coco
