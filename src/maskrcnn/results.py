"""Detections for one image as plain numpy arrays, and the COCO formats they are written in."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pycocotools import mask as mask_utils

from .files import atomic_path
from .viz import class_color, draw_detections, topmost_instance

__all__ = ["Detections", "encode_rle", "mask_pixels", "save_semantic_png", "save_instance_png"]


def encode_rle(masks: np.ndarray) -> list[dict]:
    """COCO run-length encoding of (N, H, W) boolean masks, with `counts` as str so it is JSON-ready."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"expected masks of shape (N, H, W), got {masks.shape}")
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def mask_pixels(probabilities, threshold: float) -> np.ndarray:
    """The one rule turning mask probabilities into pixels, for predict, eval and the API alike: a pixel
    belongs to the object when its probability is at least `threshold`. Boolean masks are kept as they are."""
    if hasattr(probabilities, "detach"):
        probabilities = probabilities.detach()
        if probabilities.dtype.is_floating_point:
            probabilities = probabilities.float() >= threshold
        return probabilities.cpu().numpy().astype(bool, copy=False)
    probabilities = np.asarray(probabilities)
    return probabilities if probabilities.dtype == np.bool_ else probabilities >= threshold


def _numpy(value) -> np.ndarray:
    """Torch tensors (on any device) and array-likes alike as numpy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _json_float(value) -> float:
    """A float32 as the shortest Python float that reads back to the same float32: 0.93, not
    0.9300000071525879, so predictions.json stays readable without losing anything."""
    return float(str(np.float32(value)))


@dataclass
class Detections:
    """Everything a model found in one image, as numpy arrays, sorted by descending score by convention.

    `labels` index `class_names` (index 0 is "__background__"); `category_ids[label]` is the COCO category id
    written to results files (None: the label itself). Masks are boolean at the image's own size.
    """

    boxes: np.ndarray          # (N, 4) float32, x1 y1 x2 y2 in image pixels
    labels: np.ndarray         # (N,) int64
    scores: np.ndarray         # (N,) float32
    masks: np.ndarray          # (N, H, W) bool
    class_names: list[str]
    category_ids: list[int] | None = None
    image_size: tuple[int, int] | None = None  # (H, W); taken from the masks when not given
    file_name: str | None = None

    def __post_init__(self):
        self.boxes = _numpy(self.boxes).astype(np.float32, copy=False).reshape(-1, 4)
        self.labels = _numpy(self.labels).astype(np.int64, copy=False).reshape(-1)
        self.scores = _numpy(self.scores).astype(np.float32, copy=False).reshape(-1)
        self.masks = _numpy(self.masks).astype(bool, copy=False)
        self.class_names = list(self.class_names)
        if self.category_ids is not None:
            self.category_ids = [int(c) for c in self.category_ids]
        n = len(self.boxes)
        if self.masks.ndim != 3:
            raise ValueError(f"masks must have shape (N, H, W), got {self.masks.shape}")
        if self.image_size is None:
            self.image_size = tuple(int(s) for s in self.masks.shape[1:])
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        if len(self.labels) != n or len(self.scores) != n or len(self.masks) != n:
            raise ValueError(f"boxes, labels, scores and masks must have the same length, got {n}, "
                             f"{len(self.labels)}, {len(self.scores)} and {len(self.masks)}")
        if self.masks.shape[1:] != self.image_size:
            raise ValueError(f"masks are {self.masks.shape[1:]} but the image size is {self.image_size}")

    @classmethod
    def from_model_output(cls, output: dict, class_names, category_ids=None, mask_threshold: float = 0.5,
                          file_name: str | None = None, image_size: tuple[int, int] | None = None) -> Detections:
        """From one image's model output `{boxes, labels, scores, masks (N, 1, H, W) probabilities}`.

        A pixel belongs to a mask when its probability is at least `mask_threshold`. Detections are re-sorted
        by descending score (stable), so the convention holds whatever the model's order. `image_size` is only
        needed when the output has no masks (a box-only model).
        """
        boxes, labels, scores = (_numpy(output[key]) for key in ("boxes", "labels", "scores"))
        if "masks" in output and output["masks"] is not None:
            probabilities = _numpy(output["masks"])
            if probabilities.ndim == 4:
                probabilities = probabilities[:, 0]
            masks = mask_pixels(probabilities, mask_threshold)
        elif image_size is not None:
            masks = np.zeros((len(boxes), *image_size), dtype=bool)
        else:
            raise ValueError("the model output has no masks, so image_size=(H, W) must be given")
        order = np.argsort(-scores.astype(np.float64).reshape(-1), kind="stable")
        return cls(boxes=boxes.reshape(-1, 4)[order], labels=labels.reshape(-1)[order],
                   scores=scores.reshape(-1)[order], masks=masks[order], class_names=class_names,
                   category_ids=category_ids, image_size=image_size, file_name=file_name)

    def __len__(self) -> int:
        return len(self.boxes)

    def __repr__(self) -> str:
        # The dataclass default would print every mask pixel.
        height, width = self.image_size
        found = ", ".join(f"{count} {name}" for name, count in self.counts().items()) or "nothing"
        where = f" in {self.file_name}" if self.file_name else ""
        return f"Detections({len(self)} in a {width}x{height} image{where}: {found})"

    def _name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else f"class {label}"

    @property
    def names(self) -> list[str]:
        """Class name of each detection."""
        return [self._name(label) for label in self.labels.tolist()]

    def __getitem__(self, index) -> Detections:
        """A subset (int, slice, integer or boolean array) as Detections again, so filtering never leaves the
        type; an int gives a one-detection Detections rather than a bare row."""
        if isinstance(index, (int, np.integer)):
            if not -len(self) <= index < len(self):
                raise IndexError(f"detection {index} out of range for {len(self)} detections")
            index = [int(index)]
        elif not isinstance(index, slice):
            index = np.asarray(index)
            if index.size == 0 and index.dtype != np.bool_:
                index = index.astype(np.int64)  # np.asarray([]) is float, which cannot index
            if index.dtype == np.bool_ and index.shape != (len(self),):
                raise IndexError(f"boolean index of shape {index.shape} for {len(self)} detections")
        return replace(self, boxes=self.boxes[index], labels=self.labels[index], scores=self.scores[index],
                       masks=self.masks[index])

    def filter(self, score_thresh: float) -> Detections:
        """Only the detections scoring at least `score_thresh`."""
        return self[self.scores >= score_thresh]

    def semantic_map(self) -> np.ndarray:
        """(H, W) class id per pixel, 0 background; where masks overlap, the higher score wins (as in the
        pictures). uint8 while class ids fit, else uint16."""
        top_label = max(len(self.class_names) - 1, int(self.labels.max(initial=0)))
        dtype = np.uint8 if top_label < 256 else np.uint16
        owner = topmost_instance(self.masks, self.scores)
        lookup = np.concatenate([[0], self.labels]).astype(dtype)  # owner -1 (nothing) -> 0
        return lookup[owner + 1]

    def instance_map(self) -> np.ndarray:
        """(H, W) uint16: 0 background, i + 1 where detection i is seen (higher score wins overlaps)."""
        if len(self) > np.iinfo(np.uint16).max:
            raise ValueError(f"{len(self)} detections do not fit a 16-bit instance map")
        return (topmost_instance(self.masks, self.scores) + 1).astype(np.uint16)

    def counts(self) -> dict[str, int]:
        """Detections per class name, most frequent first (ties by name), only classes present."""
        tally = Counter(self.names)
        return dict(sorted(tally.items(), key=lambda item: (-item[1], item[0])))

    def to_coco(self, image_id: int | None = None) -> list[dict]:
        """COCO results entries (one per detection), JSON-ready: plain Python numbers, bbox as [x, y, w, h],
        segmentation as RLE with str counts."""
        rles = encode_rle(self.masks)
        entries = []
        for i, (label, rle) in enumerate(zip(self.labels.tolist(), rles)):
            x1, y1, x2, y2 = (_json_float(v) for v in self.boxes[i])
            entry = {}
            if image_id is not None:
                entry["image_id"] = int(image_id)
            if self.file_name is not None:
                entry["file_name"] = str(self.file_name)
            entry["category_id"] = int(self.category_ids[label]) if self.category_ids is not None else label
            entry["category_name"] = self._name(label)
            entry["bbox"] = [x1, y1, _json_float(x2 - x1), _json_float(y2 - y1)]
            entry["score"] = _json_float(self.scores[i])
            entry["segmentation"] = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"]}
            entries.append(entry)
        return entries

    def draw(self, image: np.ndarray, **options) -> np.ndarray:
        """This image's picture; see `viz.draw_detections` for the options (alpha, show_legend, color_by)."""
        return draw_detections(image, self.boxes, self.labels, self.scores, self.masks, self.class_names,
                               **options)


def save_semantic_png(path: str | os.PathLike, semantic_map: np.ndarray, class_names) -> None:
    """Class-per-pixel map as an 8-bit palette PNG: opens as a coloured picture (same colours as the drawn
    detections, background black) while the pixel values stay the class ids. The class names go in a
    "classes" text chunk so the file explains itself."""
    semantic_map = np.asarray(semantic_map)
    if semantic_map.ndim != 2:
        raise ValueError(f"expected an (H, W) semantic map, got shape {semantic_map.shape}")
    if semantic_map.size and (semantic_map.min() < 0 or semantic_map.max() > 255):
        raise ValueError("a palette PNG holds class ids 0..255 only; this map has ids up to "
                         f"{int(semantic_map.max())}")
    palette = [0, 0, 0]
    for label in range(1, 256):
        palette.extend(class_color(label))
    picture = Image.fromarray(semantic_map.astype(np.uint8))
    picture.putpalette(palette)  # turns the "L" image into "P" keeping the values as palette indices
    info = PngInfo()
    info.add_text("classes", json.dumps(list(class_names)))
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG", pnginfo=info)


def save_instance_png(path: str | os.PathLike, instance_map: np.ndarray) -> None:
    """Instance ids as a 16-bit grayscale PNG, lossless: reads back exactly with PIL or
    cv2.imread(path, cv2.IMREAD_UNCHANGED). (It looks black in viewers; the values are the point.)"""
    instance_map = np.asarray(instance_map)
    if instance_map.ndim != 2:
        raise ValueError(f"expected an (H, W) instance map, got shape {instance_map.shape}")
    if instance_map.size and (instance_map.min() < 0 or instance_map.max() > np.iinfo(np.uint16).max):
        raise ValueError("instance ids must be in 0..65535 for a 16-bit PNG")
    with atomic_path(path) as tmp:
        Image.fromarray(instance_map.astype(np.uint16)).save(tmp, format="PNG")
