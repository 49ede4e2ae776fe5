"""Reading detections that `maskrcnn predict` (or any detector writing the same format) wrote for videos:
a JSON list of entries with `file_name`, `frame`, `category_id`, `bbox` [x, y, w, h], `score` and optionally
`segmentation` (COCO RLE) and `category_name`. Everything is checked when the file is read; the first problem
is one line naming the file, the entry and the field."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from pycocotools import mask as mask_utils

from ..errors import MaskRCNNError
from ..masks import MaskCrops
from ..results import Detections

_NEEDED = ("file_name", "frame", "category_id", "bbox", "score")


def _problem(entry, index: int) -> str | None:
    if not isinstance(entry, dict):
        return f"entry {index} is not an object"
    for key in _NEEDED:
        if key not in entry:
            hint = " (track needs detections of video frames, as `maskrcnn predict` writes for videos)" \
                if key == "frame" else ""
            return f"entry {index} has no '{key}'{hint}"
    if not isinstance(entry["file_name"], str):
        return f"entry {index}: 'file_name' must be a string"
    if isinstance(entry["frame"], bool) or not isinstance(entry["frame"], int) or entry["frame"] < 0:
        return f"entry {index}: 'frame' must be a non-negative integer, got {entry['frame']!r}"
    if isinstance(entry["category_id"], bool) or not isinstance(entry["category_id"], int) or entry["category_id"] < 1:
        return f"entry {index}: 'category_id' must be a positive integer, got {entry['category_id']!r}"
    bbox = entry["bbox"]
    if (not isinstance(bbox, list) or len(bbox) != 4 or not all(_finite(v) for v in bbox)
            or bbox[2] < 0 or bbox[3] < 0):
        return f"entry {index}: 'bbox' must be [x, y, width, height] with finite numbers and sizes >= 0"
    if not _finite(entry["score"]):
        return f"entry {index}: 'score' must be a finite number"
    segmentation = entry.get("segmentation")
    if segmentation is not None and not (isinstance(segmentation, dict)
                                         and isinstance(segmentation.get("counts"), (str, list))
                                         and isinstance(segmentation.get("size"), list)
                                         and len(segmentation["size"]) == 2):
        return f"entry {index}: 'segmentation' must be a COCO RLE {{'size': [h, w], 'counts': ...}}"
    return None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_detections(path: str | os.PathLike) -> dict[str, list[dict]]:
    """Entries per video file name (in the file's order of first appearance), each list sorted by frame."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MaskRCNNError(f"{path}: detections file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MaskRCNNError(f"{path}: cannot read detections: {error}") from None
    if not isinstance(data, list):
        raise MaskRCNNError(f"{path}: expected a JSON list of detections (predictions.json), got "
                            f"{type(data).__name__}")
    videos: dict[str, list[dict]] = {}
    sizes: dict[str, list] = {}
    for index, entry in enumerate(data):
        problem = _problem(entry, index)
        if problem is None and entry.get("segmentation") is not None:
            size = sizes.setdefault(entry["file_name"], entry["segmentation"]["size"])
            if entry["segmentation"]["size"] != size:
                problem = f"entry {index}: mask size {entry['segmentation']['size']} differs from {size} of " \
                          f"earlier entries of {entry['file_name']}"
        if problem:
            raise MaskRCNNError(f"{path}: {problem}")
        videos.setdefault(entry["file_name"], []).append(entry)
    for entries in videos.values():
        entries.sort(key=lambda e: e["frame"])  # stable: a frame's entries keep their order
    return videos


def class_names_of(videos: dict[str, list[dict]]) -> list[str]:
    """Names indexed by category id ("class N" where the file gives none; 0 is the background)."""
    names: dict[int, str] = {}
    for entries in videos.values():
        for entry in entries:
            names.setdefault(entry["category_id"], str(entry.get("category_name") or f"class {entry['category_id']}"))
    top = max(names, default=0)
    return ["__background__"] + [names.get(i, f"class {i}") for i in range(1, top + 1)]


def image_size_of(entries: list[dict]) -> tuple[int, int]:
    """(H, W) from the masks, else the smallest image holding every box."""
    for entry in entries:
        if entry.get("segmentation") is not None:
            return tuple(int(s) for s in entry["segmentation"]["size"])
    right = max((e["bbox"][0] + e["bbox"][2] for e in entries), default=1)
    bottom = max((e["bbox"][1] + e["bbox"][3] for e in entries), default=1)
    return max(int(math.ceil(bottom)), 1), max(int(math.ceil(right)), 1)


def frame_detections(entries: list[dict], class_names, image_size: tuple[int, int],
                     num_frames: int | None = None) -> Iterator[tuple[int, list[dict], Detections]]:
    """(frame, its entries, their Detections) for frames 0.. up to the last entry's (or `num_frames` - 1):
    frames without entries give empty Detections, so a tracker sees every frame."""
    last = max((e["frame"] for e in entries), default=-1)
    total = max(last + 1, num_frames or 0)
    position = 0
    for t in range(total):
        start = position
        while position < len(entries) and entries[position]["frame"] == t:
            position += 1
        chunk = entries[start:position]
        yield t, chunk, _detections(chunk, class_names, image_size)


def _detections(entries: list[dict], class_names, image_size: tuple[int, int]) -> Detections:
    crops, offsets = [], []
    for entry in entries:
        if entry.get("segmentation") is not None:
            rle = dict(entry["segmentation"])
            if isinstance(rle["counts"], str):
                rle["counts"] = rle["counts"].encode("ascii")
            try:
                crops.append(mask_utils.decode(rle).astype(bool))
            except (TypeError, ValueError) as error:
                raise MaskRCNNError(f"{entry['file_name']} frame {entry['frame']}: cannot decode its "
                                    f"'segmentation' RLE: {error}") from None
        else:
            crops.append(np.zeros((0, 0), dtype=bool))
        offsets.append((0, 0))
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (e["bbox"] for e in entries)]
    return Detections(boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                      labels=[e["category_id"] for e in entries], scores=[e["score"] for e in entries],
                      masks=MaskCrops(crops, np.asarray(offsets).reshape(-1, 2), image_size),
                      class_names=class_names, image_size=image_size, file_name=entries[0]["file_name"] if entries
                      else None)
