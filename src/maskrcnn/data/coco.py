"""COCO-format instance segmentation dataset.

The json and the image headers are checked up front (maskrcnn/data/validate.py) so a broken dataset
fails in the first seconds with every problem named (file, image or annotation, field), not an hour
into training with a KeyError or inside pycocotools.
"""

from __future__ import annotations

import contextlib
import io
import json
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
from maskrcnn.data.validate import checked_coco
from maskrcnn.data.validate_keypoints import labelled_keypoints
from maskrcnn.errors import MaskRCNNError


@dataclass
class _ImageInstances:
    """The usable (non-crowd, non-degenerate) instances of one image, decided once at construction."""

    annotation_ids: list[int]
    boxes: np.ndarray  # (N, 4) float32 xyxy, clipped to the image
    labels: np.ndarray  # (N,) int64, contiguous 1..K
    keypoints: np.ndarray  # (N, K, 3) float32 x, y, v (K = 0 when the dataset has no keypoints)


class CocoDataset(Dataset):
    """Images and instance targets from a COCO json, for training and evaluation.

    Each item is `(image, target)`: image a (3,H,W) float32 tensor in [0,1]; target a dict with
    `boxes` (N,4) float32 xyxy pixels, `labels` (N,) int64 in 1..K, `masks` (N,H,W) uint8,
    `image_id` int and `file_name` str.

    Every annotation and image header is checked at construction and all problems are raised together
    in one MaskRCNNError; with `skip_invalid=True` the images and annotations with problems are left out
    instead (one summary warning). Crowd regions, boxes under 1 px and empty masks are not training
    positives, so they are left out of targets (one summary warning per dataset). `coco` keeps the full
    json for COCO evaluation; missing `iscrowd`/`area` fields are filled in there so COCOeval accepts
    hand-made files.

    `transforms` is called as `transforms(image, target)`. With `augment_seed` set it is called as
    `transforms(image, target, generator=g)` where g is seeded from (augment_seed, epoch, index), so
    augmentation is reproducible and independent of DataLoader worker count; call `set_epoch` each
    epoch (works with non-persistent workers, which receive a fresh copy of the dataset per epoch).
    """

    def __init__(self, annotations: str | Path, images: str | Path, transforms=None,
                 augment_seed: int | None = None, skip_invalid: bool = False):
        self.annotations_path = Path(annotations)
        self.images_dir = Path(images)
        self.transforms = transforms
        self.augment_seed = augment_seed
        self.epoch = 0
        self._source = str(annotations)

        data = checked_coco(load_json(self.annotations_path), self._source, self.images_dir, skip_invalid)

        categories = sorted(data["categories"], key=lambda category: category["id"])
        self.category_ids: list[int] = [0] + [category["id"] for category in categories]
        self.class_names: list[str] = ["__background__"] + [str(category.get("name", category["id"]))
                                                            for category in categories]
        self.num_classes = len(self.category_ids)
        self._label_of_category = {category_id: label for label, category_id in enumerate(self.category_ids)
                                   if label > 0}
        with_keypoints = next((category for category in categories if category.get("keypoints")), {})
        self.keypoint_names: list[str] = list(with_keypoints.get("keypoints", []))
        self.skeleton: list[list[int]] = [list(edge) for edge in with_keypoints.get("skeleton", [])]

        self.image_ids: list[int] = [image["id"] for image in data["images"]]
        self.aspect_ratios: list[float] = [image["width"] / image["height"] for image in data["images"]]
        self._instances, self.skipped = self._select_instances(data)
        self.coco = build_coco(data)
        self.coco.maskrcnn_checked = True  # coco_evaluate need not check it again

        dropped = self.skipped["degenerate_box"] + self.skipped["empty_mask"]
        if dropped:
            warnings.warn(f"{self._source}: left out {dropped} annotations "
                          f"({self.skipped['degenerate_box']} with a box under 1 px, "
                          f"{self.skipped['empty_mask']} with an empty mask)", stacklevel=2)

    def _select_instances(self, data: dict) -> tuple[list[_ImageInstances], dict[str, int]]:
        images_by_id = {image["id"]: image for image in data["images"]}
        per_image: dict[int, list[tuple[int, list[float], int, list]]] = {image_id: [] for image_id in self.image_ids}
        no_keypoints = [0.0] * (3 * len(self.keypoint_names))
        skipped = {"crowd": 0, "degenerate_box": 0, "empty_mask": 0}
        for annotation in data["annotations"]:
            image = images_by_id[annotation["image_id"]]
            width, height = image["width"], image["height"]
            if "area" not in annotation:
                annotation["area"] = float(mask_utils.area(self._rle(annotation, height, width)))
            if "keypoints" in annotation and "num_keypoints" not in annotation:  # pycocotools needs it
                annotation["num_keypoints"] = labelled_keypoints(annotation["keypoints"])
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
            keypoints = annotation.get("keypoints") or no_keypoints
            per_image[annotation["image_id"]].append((annotation["id"], box, label, keypoints))

        instances = []
        for image_id in self.image_ids:
            rows = per_image[image_id]
            instances.append(_ImageInstances(
                annotation_ids=[row[0] for row in rows],
                boxes=np.array([row[1] for row in rows], dtype=np.float32).reshape(-1, 4),
                labels=np.array([row[2] for row in rows], dtype=np.int64),
                keypoints=_unlabelled_at_zero(np.array([row[3] for row in rows], dtype=np.float32)
                                              .reshape(len(rows), len(self.keypoint_names), 3)),
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
        if self.keypoint_names:
            target["keypoints"] = torch.from_numpy(instances.keypoints.copy())
        if self.transforms is not None:
            if self.augment_seed is None:
                image, target = self.transforms(image, target)
            else:
                generator = seeded_generator(self.augment_seed, self.epoch, index)
                image, target = self.transforms(image, target, generator=generator)
        return image, target


def _unlabelled_at_zero(keypoints: np.ndarray) -> np.ndarray:
    """COCO's convention, which some files break: a keypoint with v = 0 is (0, 0, 0)."""
    return keypoints * (keypoints[..., 2:] > 0)


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


def load_json(path: Path) -> dict:
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


def build_coco(data: dict) -> COCO:
    """A pycocotools COCO index of already-checked data (see maskrcnn/data/validate.py)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        coco.createIndex()
    return coco
