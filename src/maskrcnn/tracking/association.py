"""How well a detection fits a track, and the one-to-one assignment of detections to tracks.

The similarity uses what Mask R-CNN gives and a box tracker does not: the overlap of the masks (the track's
last mask moved to where the motion model expects it), beside the overlap of the boxes, and the class
(a detection of another class never continues a track). Masks stay box-local crops (`MaskCrops`): the
overlap of two masks is counted in the intersection of their windows only, never on full-image masks.
The assignment is `scipy.optimize.linear_sum_assignment` on 1 - similarity.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def box_iou(a, b) -> np.ndarray:
    """(N, M) IoU of x1 y1 x2 y2 boxes `a` (N, 4) and `b` (M, 4)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    width = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    height = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = width * height
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def crop_iou(crop_a: np.ndarray, offset_a, crop_b: np.ndarray, offset_b) -> float:
    """IoU of two boolean masks given as crops at (row, column) offsets; the pixels are compared only where
    the two windows overlap (everything outside a crop is False). Offsets may lie outside the image."""
    area_a, area_b = int(crop_a.sum()), int(crop_b.sum())
    if area_a == 0 or area_b == 0:
        return 0.0
    (top_a, left_a), (top_b, left_b) = (int(v) for v in offset_a), (int(v) for v in offset_b)
    top, left = max(top_a, top_b), max(left_a, left_b)
    bottom = min(top_a + crop_a.shape[0], top_b + crop_b.shape[0])
    right = min(left_a + crop_a.shape[1], left_b + crop_b.shape[1])
    if bottom <= top or right <= left:
        return 0.0
    window_a = crop_a[top - top_a:bottom - top_a, left - left_a:right - left_a]
    window_b = crop_b[top - top_b:bottom - top_b, left - left_b:right - left_b]
    inter = int(np.count_nonzero(window_a & window_b))
    return inter / (area_a + area_b - inter)


def similarity(track_boxes, track_labels, track_masks, det_boxes, det_labels, det_masks,
               mask_weight: float = 0.5) -> np.ndarray:
    """(tracks, detections) similarity in 0..1: `mask_weight` x mask IoU + the rest x box IoU, 0 across classes.

    `track_masks` / `det_masks`: per row a (crop, (row, column) offset) pair, or None where a mask is unknown
    (an empty crop counts as unknown); where either mask is unknown the box IoU alone is used. Mask IoU is only
    computed for pairs of the same class whose boxes overlap."""
    boxes = box_iou(track_boxes, det_boxes)
    same_class = np.asarray(track_labels).reshape(-1, 1) == np.asarray(det_labels).reshape(1, -1)
    result = np.where(same_class, boxes, 0.0)
    if mask_weight > 0:
        for i, j in zip(*np.nonzero(same_class & (boxes > 0))):
            a, b = track_masks[i], det_masks[j]
            if a is None or b is None or a[0].size == 0 or b[0].size == 0:
                continue
            result[i, j] = mask_weight * crop_iou(a[0], a[1], b[0], b[1]) + (1 - mask_weight) * boxes[i, j]
    return result


def assign(sim: np.ndarray, min_similarity: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """One-to-one matches (row, column) maximising the total similarity, keeping only pairs with similarity
    >= `min_similarity`; also the unmatched rows and columns, in increasing order."""
    sim = np.asarray(sim, dtype=np.float64)
    rows, cols = sim.shape
    matches: list[tuple[int, int]] = []
    if rows and cols:
        # Pairs below the threshold may not be matched at all: a cost above any sum of allowed costs makes the
        # solver avoid them whenever it can, and they are dropped afterwards when it cannot.
        allowed = sim >= min_similarity
        cost = np.where(allowed, 1.0 - sim, 1.0 + min(rows, cols))
        for i, j in zip(*linear_sum_assignment(cost)):
            if allowed[i, j]:
                matches.append((int(i), int(j)))
    matched_rows = {i for i, _ in matches}
    matched_cols = {j for _, j in matches}
    return (matches, [i for i in range(rows) if i not in matched_rows], [j for j in range(cols) if j not in matched_cols])
