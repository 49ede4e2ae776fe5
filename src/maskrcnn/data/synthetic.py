"""A synthetic "shapes" dataset in COCO format, for smoke tests and quick training runs.

Classes differ by SHAPE only (colours are random), objects overlap and occlude each other, and
backgrounds are textured, so a model has to learn outlines rather than colours. It is small enough
for a few hundred iterations of a small Mask R-CNN to reach a clearly non-zero AP.

Masks are the visible part of each object. Objects whose whole outline is visible are written as
COCO polygons, the others (occluded, cut by the image border, or rings with a hole) as compressed
RLE, so both segmentation formats are exercised.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from maskrcnn.data.coco import decode_rles
from maskrcnn.data.validate_keypoints import labelled_keypoints

CLASS_NAMES = ("circle", "triangle", "square", "star", "hexagon", "ring")

MIN_OBJECT_FRACTION = 0.08  # object diameter relative to the shorter image side
MAX_OBJECT_FRACTION = 0.5
MIN_OBJECTS, MAX_OBJECTS = 2, 8
EMPTY_IMAGE_PROBABILITY = 0.05
MIN_VISIBLE_FRACTION = 0.3  # an object must keep this much of its area visible ...
MIN_VISIBLE_PIXELS = 24  # ... and at least this many pixels
MAX_ASPECT = 1.33  # the longer side is up to this times the shorter one
RING_HOLE_RATIO = 0.55
JPEG_QUALITY = 95
_SPLIT_NUMBERS = {"train": 0, "val": 1}


def make_shapes(out_dir: str | Path, num_train: int = 400, num_val: int = 60, size: int = 256,
                seed: int = 0, progress: bool = True, keypoints: bool = False) -> dict:
    """Write the dataset under out_dir and return its paths and counts.

    Layout: annotations/instances_{train,val}.json, images in train/ and val/ (JPEG, quality 95). With
    `keypoints`, the objects are upright "figures" whose five tips are COCO keypoints instead
    (maskrcnn/data/synthetic_figures.py), in annotations/keypoints_{train,val}.json.
    Each image's shorter side is `size`; the longer side varies up to 1.33x, half of the images
    landscape and half portrait. The output is a pure function of the arguments: image i of a split
    draws from its own numpy Generator seeded with (seed, split, i).
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be at least 1, got {num_train} and {num_val}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    root = Path(out_dir)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    kind = _kind(keypoints)
    summary = {"root": str(root), "class_names": [category["name"] for category in kind.categories]}
    for split, count in (("train", num_train), ("val", num_val)):
        annotations_path = root / "annotations" / f"{kind.file_prefix}_{split}.json"
        images_dir = root / split
        images_dir.mkdir(parents=True, exist_ok=True)
        coco = _make_split(split, count, size, seed, images_dir, progress, kind)
        with open(annotations_path, "w", encoding="utf-8") as file:
            json.dump(coco, file)
        summary[f"{split}_annotations"] = str(annotations_path)
        summary[f"{split}_images"] = str(images_dir)
        summary[f"num_{split}_images"] = len(coco["images"])
        summary[f"num_{split}_instances"] = len(coco["annotations"])
    return summary


@dataclass(frozen=True)
class _Kind:
    """What a dataset is made of: its categories, the prefix of its annotation files, how many objects an
    image has, how one is placed, and the COCO keypoints of an object (None: no keypoints)."""

    categories: list
    file_prefix: str
    counts: tuple[int, int]
    random_shape: Callable
    keypoints: Callable | None = None


def _kind(keypoints: bool) -> _Kind:
    if not keypoints:
        categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)]
        return _Kind(categories, "instances", (MIN_OBJECTS, MAX_OBJECTS), _random_shape)
    from maskrcnn.data import synthetic_figures as figures

    return _Kind([figures.category()], "keypoints", (figures.MIN_FIGURES, figures.MAX_FIGURES),
                 figures.random_figure, figures.figure_keypoints)


def _make_split(split: str, count: int, size: int, seed: int, images_dir: Path, progress: bool,
                kind: _Kind) -> dict:
    images, annotations = [], []
    for index in tqdm(range(count), desc=f"shapes {split}", disable=not progress, unit="img"):
        rng = np.random.default_rng([seed, _SPLIT_NUMBERS[split], index])
        pixels, objects = _make_image(rng, size, kind)
        image_id = index + 1
        file_name = f"{image_id:06d}.jpg"
        cv2.imwrite(str(images_dir / file_name), pixels[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        height, width = pixels.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for number, shape in enumerate(objects):
            annotation = _annotation(shape, height, width)
            annotation.update(id=len(annotations) + 1, image_id=image_id)
            if kind.keypoints is not None:
                annotation["keypoints"] = kind.keypoints(objects, number, height, width)
                annotation["num_keypoints"] = labelled_keypoints(annotation["keypoints"])
            annotations.append(annotation)
    return {
        "info": {"description": f"maskrcnn synthetic shapes, {split} split, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": kind.categories,
    }


class _Shape:
    """One placed object: its outline polygons, full (amodal) mask and currently visible mask."""

    def __init__(self, label: int, outer: list[float], hole: list[float] | None, full: np.ndarray, area: float):
        self.label = label
        self.outer = outer
        self.hole = hole
        self.full = full
        self.visible = full.copy()
        self.points: np.ndarray | None = None  # keypoints (K, 2), for the figures of the keypoint dataset
        self.min_visible = max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * area)


def _make_image(rng: np.random.Generator, size: int, kind: _Kind) -> tuple[np.ndarray, list[_Shape]]:
    long_side = round(size * rng.uniform(1.0, MAX_ASPECT))
    height, width = (size, long_side) if rng.random() < 0.5 else (long_side, size)
    image = _background(rng, height, width)

    wanted = 0 if rng.random() < EMPTY_IMAGE_PROBABILITY else int(rng.integers(kind.counts[0], kind.counts[1] + 1))
    shapes: list[_Shape] = []
    for _ in range(wanted * 10):  # rejection sampling: retry placements that hide too much
        if len(shapes) == wanted:
            break
        shape = kind.random_shape(rng, height, width, size)
        if shape.full.sum() < shape.min_visible:
            continue  # mostly outside the image
        still_visible = [other.visible & ~shape.full for other in shapes]
        if any(visible.sum() < other.min_visible for visible, other in zip(still_visible, shapes)):
            continue
        for other, visible in zip(shapes, still_visible):
            other.visible = visible
        shapes.append(shape)

    for shape in shapes:
        _paint(rng, image, shape.full)
    if rng.random() < 0.5:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=rng.uniform(0.4, 1.0))
    image += rng.normal(0.0, rng.uniform(2.0, 12.0), size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).round().astype(np.uint8), shapes


def _random_shape(rng: np.random.Generator, height: int, width: int, size: int) -> _Shape:
    label = int(rng.integers(len(CLASS_NAMES))) + 1
    name = CLASS_NAMES[label - 1]
    diameter = size * math.exp(rng.uniform(math.log(MIN_OBJECT_FRACTION), math.log(MAX_OBJECT_FRACTION)))
    radius = diameter / 2
    center_x = rng.uniform(0.2 * radius, width - 0.2 * radius)
    center_y = rng.uniform(0.2 * radius, height - 0.2 * radius)
    angle = rng.uniform(0, 2 * math.pi)

    unit = _unit_outline(name)
    outer = _place(unit, radius, angle, center_x, center_y)
    full = _rasterize(outer, height, width)
    area = _polygon_area(outer)
    hole = None
    if name == "ring":
        hole = _place(unit, radius * RING_HOLE_RATIO, angle, center_x, center_y)
        full &= ~_rasterize(hole, height, width)
        area -= _polygon_area(hole)
    return _Shape(label, outer, hole, full, area)


def _unit_outline(name: str) -> np.ndarray:
    """Vertices (K,2) of the shape with circumradius 1 around the origin."""
    if name in ("circle", "ring"):
        corners = 48
    elif name == "star":
        angles = np.arange(10) * (math.pi / 5)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    else:
        corners = {"triangle": 3, "square": 4, "hexagon": 6}[name]
    angles = np.arange(corners) * (2 * math.pi / corners)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _place(unit: np.ndarray, radius: float, angle: float, center_x: float, center_y: float) -> list[float]:
    """Scale, rotate and move an outline; coordinates rounded as they will be stored in the json."""
    cos, sin = math.cos(angle), math.sin(angle)
    x = radius * (unit[:, 0] * cos - unit[:, 1] * sin) + center_x
    y = radius * (unit[:, 0] * sin + unit[:, 1] * cos) + center_y
    return [round(float(value), 2) for value in np.stack([x, y], axis=1).ravel()]


def _rasterize(polygon: list[float], height: int, width: int) -> np.ndarray:
    """Rasterize exactly as pycocotools will when reading the json, so image and masks agree."""
    return decode_rles(mask_utils.frPyObjects([polygon], height, width), height, width)[0].astype(bool)


def _polygon_area(polygon: list[float]) -> float:
    x, y = np.asarray(polygon[0::2]), np.asarray(polygon[1::2])
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(40, 255), rng.uniform(60, 255)]]], dtype=np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A gradient, blotchy noise or stripes, sometimes with line clutter, as float32 HxWx3 in 0..255."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = rng.integers(3)
    if kind == 0:
        angle = rng.uniform(0, 2 * math.pi)
        ramp = xs * math.cos(angle) + ys * math.sin(angle)
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
        start, end = _random_colour(rng), _random_colour(rng)
        image = start + ramp[:, :, None] * (end - start)
    elif kind == 1:
        grid = rng.uniform(0, 255, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.float32)
        image = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        image = 0.6 * image + 0.4 * _random_colour(rng)
    else:
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 40)
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) * (2 * math.pi / period)
        weight = (0.5 + 0.5 * np.sin(phase))[:, :, None]
        first, second = _random_colour(rng), _random_colour(rng)
        image = first + weight * (second - first)
    image = np.ascontiguousarray(image, dtype=np.float32)
    if rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 6))):
            start = (int(rng.integers(width)), int(rng.integers(height)))
            end = (int(rng.integers(width)), int(rng.integers(height)))
            cv2.line(image, start, end, _random_colour(rng).tolist(), int(rng.integers(1, 4)))
    return image


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> None:
    """Fill the mask with a random colour plus a linear shading, so no object is one flat colour."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return
    colour = _random_colour(rng)
    extent = max(float(xs.max() - xs.min()), float(ys.max() - ys.min()), 1.0)
    slope = rng.uniform(-60, 60, size=2) / extent
    shade = slope[0] * (xs - xs.mean()) + slope[1] * (ys - ys.mean())
    image[ys, xs] = colour + shade[:, None].astype(np.float32)


def _annotation(shape: _Shape, height: int, width: int) -> dict:
    fully_visible = shape.hole is None and _inside(shape.outer, height, width) and \
        int(shape.visible.sum()) == int(shape.full.sum())
    rle = mask_utils.encode(np.asfortranarray(shape.visible.astype(np.uint8)))
    if fully_visible:
        segmentation = [shape.outer]
    else:
        segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    return {
        "category_id": shape.label,
        "segmentation": segmentation,
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "area": float(mask_utils.area(rle)),
        "iscrowd": 0,
    }


def _inside(polygon: list[float], height: int, width: int) -> bool:
    xs, ys = polygon[0::2], polygon[1::2]
    return min(xs) >= 0 and min(ys) >= 0 and max(xs) <= width and max(ys) <= height
