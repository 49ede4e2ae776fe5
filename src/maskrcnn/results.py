"""Detections for one image as plain numpy arrays, and the COCO formats they are written in."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pycocotools import mask as mask_utils

from .files import atomic_path
from .masks import MaskCrops
from .viz import class_color, draw_detections, topmost_instance

__all__ = ["Detections", "MaskCrops", "coco_results", "encode_rle", "mask_pixels", "save_semantic_png",
           "save_instance_png"]


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


def coco_results(boxes, labels, scores, rles, *, category_ids=None, fields: dict | None = None,
                 category_names=None, exact: bool = False, keypoints=None, keypoint_scores=None) -> list[dict]:
    """COCO results entries, one per row of float32 `boxes` (x1 y1 x2 y2), `labels`, `scores` and `rles`
    (None: no segmentation), JSON-ready: plain Python numbers, bbox as [x, y, w, h].

    Every entry starts with `fields` (e.g. image_id, file_name); `category_ids[label]` is written as the
    category id (None: the label itself), followed by `category_names[i]` where given. Numbers are rounded
    with `_json_float` (readable files) unless `exact`, which keeps them as they are: evaluation scores the
    model's own numbers. With `keypoints` (N, K, 3), each entry gets COCO's keypoint result
    `keypoints: [x1, y1, v1, x2, ...]` (and `keypoint_scores: [s1, ...]`, which COCO's tools ignore)."""
    number = float if exact else _json_float
    entries = []
    for i, label in enumerate(np.asarray(labels).tolist()):
        label = int(label)
        x1, y1, x2, y2 = (number(v) for v in boxes[i])
        entry = dict(fields or {})
        entry["category_id"] = int(category_ids[label]) if category_ids is not None else label
        if category_names is not None:
            entry["category_name"] = category_names[i]
        entry["bbox"] = [x1, y1, number(x2 - x1), number(y2 - y1)]
        entry["score"] = number(scores[i])
        if rles is not None:
            entry["segmentation"] = {"size": [int(s) for s in rles[i]["size"]], "counts": rles[i]["counts"]}
        if keypoints is not None:
            entry["keypoints"] = [number(v) if j % 3 < 2 else int(round(float(v)))
                                  for j, v in enumerate(np.asarray(keypoints[i]).reshape(-1))]
            if keypoint_scores is not None:
                entry["keypoint_scores"] = [number(v) for v in keypoint_scores[i]]
        entries.append(entry)
    return entries


class Detections:
    """Everything a model found in one image, as numpy arrays, sorted by descending score by convention.

    `labels` index `class_names` (index 0 is "__background__"); `category_ids[label]` is the COCO category id
    written to results files (None: the label itself). Masks are boolean at the image's own size, but held
    compactly (`mask_crops`, a `MaskCrops`: each mask's bounding crop and its offset), so memory follows the
    objects, not image size x detections. `masks` makes the full (N, H, W) array when asked for (each time);
    `mask(i)` makes one. `masks=` takes either full masks or a `MaskCrops`, or None for a model without a
    mask branch (then `image_size` is needed; `has_masks` is False, the crops are empty and no segmentation
    is written).

    A keypoint model's detections also hold `keypoints` (N, K, 3) float32 x, y, visibility in image pixels
    and `keypoint_scores` (N, K), with the model's `keypoint_names` and `skeleton` (pairs of 1-based
    keypoint numbers, for drawing); all None otherwise.
    """

    def __init__(self, boxes, labels, scores, masks, class_names, category_ids=None,
                 image_size: tuple[int, int] | None = None, file_name: str | None = None, *,
                 keypoints=None, keypoint_scores=None, keypoint_names=None, skeleton=None):
        self.boxes = _numpy(boxes).astype(np.float32, copy=False).reshape(-1, 4)    # (N, 4) x1 y1 x2 y2, pixels
        self.labels = _numpy(labels).astype(np.int64, copy=False).reshape(-1)       # (N,)
        self.scores = _numpy(scores).astype(np.float32, copy=False).reshape(-1)     # (N,)
        self.class_names = list(class_names)
        self.category_ids = None if category_ids is None else [int(c) for c in category_ids]
        self.file_name = file_name
        self.has_masks = masks is not None
        if masks is None:
            if image_size is None:
                raise ValueError("detections without masks need image_size=(H, W)")
            masks = MaskCrops([np.zeros((0, 0), dtype=bool)] * len(self.boxes), np.zeros((len(self.boxes), 2)),
                              image_size)
        if not isinstance(masks, MaskCrops):
            masks = _numpy(masks)
            if masks.ndim != 3:
                raise ValueError(f"masks must have shape (N, H, W), got {masks.shape}")
            masks = MaskCrops.from_full(masks)
        self.mask_crops = masks
        self.image_size = masks.image_size if image_size is None else (int(image_size[0]), int(image_size[1]))
        n = len(self.boxes)
        if len(self.labels) != n or len(self.scores) != n or len(masks) != n:
            raise ValueError(f"boxes, labels, scores and masks must have the same length, got {n}, "
                             f"{len(self.labels)}, {len(self.scores)} and {len(masks)}")
        if masks.image_size != self.image_size:
            raise ValueError(f"masks are {masks.image_size} but the image size is {self.image_size}")
        self._set_keypoints(keypoints, keypoint_scores, keypoint_names, skeleton)

    def _set_keypoints(self, keypoints, keypoint_scores, keypoint_names, skeleton) -> None:
        self.keypoints = self.keypoint_scores = None
        self.keypoint_names = None if keypoint_names is None else list(keypoint_names)
        self.skeleton = [] if skeleton is None else [(int(a), int(b)) for a, b in skeleton]
        if keypoints is None:
            return
        self.keypoints = _numpy(keypoints).astype(np.float32, copy=False)
        n = len(self.boxes)
        if self.keypoints.ndim != 3 or len(self.keypoints) != n or self.keypoints.shape[2] != 3:
            raise ValueError(f"keypoints must have shape ({n}, K, 3), got {self.keypoints.shape}")
        scores = np.ones(self.keypoints.shape[:2]) if keypoint_scores is None else _numpy(keypoint_scores)
        self.keypoint_scores = scores.astype(np.float32, copy=False)
        if self.keypoint_scores.shape != self.keypoints.shape[:2]:
            raise ValueError(f"keypoint_scores must have shape {self.keypoints.shape[:2]}, "
                             f"got {self.keypoint_scores.shape}")

    @property
    def masks(self) -> np.ndarray:
        """(N, H, W) bool, made from the crops on each access: N x H x W bytes (prefer `mask(i)`,
        `mask_crops` or the methods below for large images)."""
        return self.mask_crops.full()

    @masks.setter
    def masks(self, masks) -> None:
        crops = MaskCrops.coerce(masks)
        if len(crops) != len(self) or crops.image_size != self.image_size:
            raise ValueError(f"expected {len(self)} masks of size {self.image_size}, got {len(crops)} of "
                             f"size {crops.image_size}")
        self.mask_crops = crops

    def mask(self, i: int) -> np.ndarray:
        """Detection i's mask at image size, (H, W) bool."""
        return self.mask_crops.mask(range(len(self))[i])

    @classmethod
    def from_model_output(cls, output: dict, class_names, category_ids=None, mask_threshold: float = 0.5,
                          file_name: str | None = None, image_size: tuple[int, int] | None = None,
                          keypoint_names=None, skeleton=None) -> Detections:
        """From one image's model output: `{boxes, labels, scores}` and either `masks` (N, 1, H, W)
        probabilities, or `mask_crops` + `mask_offsets` + `image_size` (the compact output of
        `MaskRCNN.predict(images, masks="crops")`: probabilities in crops, 0 outside).

        A pixel belongs to a mask when its probability is at least `mask_threshold` (masks or crops that are
        boolean already are taken as they are). Detections are re-sorted
        by descending score (stable), so the convention holds whatever the model's order. `image_size` is only
        needed when the output has no masks and no `image_size` (a model without a mask branch). A keypoint
        model's `keypoints` and `keypoints_scores` are kept (with `keypoint_names` and `skeleton`).
        """
        boxes, labels, scores = (_numpy(output[key]) for key in ("boxes", "labels", "scores"))
        order = np.argsort(-scores.astype(np.float64).reshape(-1), kind="stable")
        if output.get("mask_crops") is not None:
            size = tuple(int(s) for s in _numpy(output["image_size"]).tolist())
            crops = [_numpy(output["mask_crops"][i]) for i in order.tolist()]
            offsets = _numpy(output["mask_offsets"])[order]
            if all(c.dtype == np.bool_ for c in crops):
                masks = MaskCrops(crops, offsets, size)
            else:
                masks = MaskCrops.from_probabilities(crops, offsets, size, mask_threshold)
        elif output.get("masks") is not None:
            probabilities = _numpy(output["masks"])
            if probabilities.ndim == 4:
                probabilities = probabilities[:, 0]
            masks = mask_pixels(probabilities, mask_threshold)[order]
        elif image_size is not None or output.get("image_size") is not None:
            masks = None
            image_size = image_size or tuple(int(s) for s in _numpy(output["image_size"]).tolist())
        else:
            raise ValueError("the model output has no masks, so image_size=(H, W) must be given")
        keypoints = {}
        if output.get("keypoints") is not None:
            keypoints = dict(keypoints=_numpy(output["keypoints"])[order],
                             keypoint_scores=_numpy(output["keypoints_scores"])[order])
        return cls(boxes=boxes.reshape(-1, 4)[order], labels=labels.reshape(-1)[order],
                   scores=scores.reshape(-1)[order], masks=masks, class_names=class_names,
                   category_ids=category_ids, image_size=image_size, file_name=file_name,
                   keypoint_names=keypoint_names, skeleton=skeleton, **keypoints)

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
        keypoints = {} if self.keypoints is None else dict(keypoints=self.keypoints[index],
                                                            keypoint_scores=self.keypoint_scores[index])
        return Detections(self.boxes[index], self.labels[index], self.scores[index],
                          self.mask_crops[index] if self.has_masks else None, self.class_names, self.category_ids,
                          self.image_size, self.file_name, keypoint_names=self.keypoint_names,
                          skeleton=self.skeleton, **keypoints)

    def filter(self, score_thresh: float) -> Detections:
        """Only the detections scoring at least `score_thresh`."""
        return self[self.scores >= score_thresh]

    def semantic_map(self) -> np.ndarray:
        """(H, W) class id per pixel, 0 background; where masks overlap, the higher score wins (as in the
        pictures). uint8 while class ids fit, else uint16."""
        top_label = max(len(self.class_names) - 1, int(self.labels.max(initial=0)))
        dtype = np.uint8 if top_label < 256 else np.uint16
        owner = topmost_instance(self.mask_crops, self.scores)
        lookup = np.concatenate([[0], self.labels]).astype(dtype)  # owner -1 (nothing) -> 0
        return lookup[owner + 1]

    def instance_map(self) -> np.ndarray:
        """(H, W) uint16: 0 background, i + 1 where detection i is seen (higher score wins overlaps)."""
        if len(self) > np.iinfo(np.uint16).max:
            raise ValueError(f"{len(self)} detections do not fit a 16-bit instance map")
        return (topmost_instance(self.mask_crops, self.scores) + 1).astype(np.uint16)

    def counts(self) -> dict[str, int]:
        """Detections per class name, most frequent first (ties by name), only classes present."""
        tally = Counter(self.names)
        return dict(sorted(tally.items(), key=lambda item: (-item[1], item[0])))

    def to_coco(self, image_id: int | None = None, frame: int | None = None) -> list[dict]:
        """COCO results entries (one per detection), JSON-ready: plain Python numbers, bbox as [x, y, w, h],
        segmentation as RLE with str counts (with masks), COCO keypoint results `keypoints: [x, y, v, ...]`
        (with keypoints). Each starts with `image_id`, `file_name` and a video's `frame` where known."""
        fields = {}
        if image_id is not None:
            fields["image_id"] = int(image_id)
        if self.file_name is not None:
            fields["file_name"] = str(self.file_name)
        if frame is not None:
            fields["frame"] = int(frame)
        return coco_results(self.boxes, self.labels, self.scores, self.mask_crops.to_rle() if self.has_masks else None,
                            category_ids=self.category_ids, fields=fields, category_names=self.names,
                            keypoints=self.keypoints, keypoint_scores=self.keypoint_scores)

    def draw(self, image: np.ndarray, **options) -> np.ndarray:
        """This image's picture; see `viz.draw_detections` for the options (alpha, show_legend, color_by)."""
        if self.keypoints is not None:
            options = {"keypoints": self.keypoints, "skeleton": self.skeleton, **options}
        return draw_detections(image, self.boxes, self.labels, self.scores, self.mask_crops if self.has_masks else None,
                               self.class_names, **options)


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
