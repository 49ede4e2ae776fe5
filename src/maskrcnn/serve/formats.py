"""The JSON answer of `POST /v1/predict`: `Detections.to_coco()` entries (the ones `maskrcnn predict` writes),
with the segmentation as COCO RLE, as polygons or left out."""

from __future__ import annotations

import cv2
import numpy as np

MASK_FORMATS = ("rle", "polygon", "none")


def mask_polygons(detections, i: int) -> list[list[float]]:
    """The outer outlines of mask `i` as COCO polygons ([x1, y1, x2, y2, ...] in image pixels, through
    pixel centres), found by OpenCV's findContours on the mask's crop. Holes are not outlined (COCO
    polygons are a union of filled shapes); outlines of fewer than 3 points are left out."""
    crops = detections.mask_crops
    crop = np.ascontiguousarray(crops.crops[i], dtype=np.uint8)
    top, left = crops.offsets[i].tolist()
    contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        if len(contour) < 3:
            continue
        points = contour.reshape(-1, 2).astype(np.float64) + (left + 0.5, top + 0.5)
        polygons.append([round(float(v), 2) for v in points.reshape(-1)])
    return polygons


def instances_json(detections, mask_format: str) -> list[dict]:
    entries = detections.to_coco()
    for i, entry in enumerate(entries):
        if mask_format == "none":
            del entry["segmentation"]
        elif mask_format == "polygon":
            entry["segmentation"] = mask_polygons(detections, i)
    return entries
