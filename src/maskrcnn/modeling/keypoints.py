"""Keypoints on the heatmap grid and back: `heatmap_targets` encodes ground-truth keypoints as the index of
the heatmap cell they fall in (the training target), `heatmaps_to_keypoints` decodes predicted heatmaps
into (x, y, visibility) and a score per keypoint, both as torchvision does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# COCO's person keypoints and skeleton (1-based keypoint indices, as in person_keypoints_*.json): what a
# torchvision Keypoint R-CNN checkpoint, which carries no names, was trained on.
COCO_PERSON_KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder", "left_elbow",
    "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
    "right_ankle",
)
COCO_PERSON_SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9), (8, 10),
    (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)


def keypoint_names(config) -> list[str]:
    """A ModelConfig's keypoint names (keypoint_<i> where the weights came without them); [] without keypoints."""
    return list(config.keypoint_names) or [f"keypoint_{i}" for i in range(1, config.keypoints + 1)]


def heatmaps_to_keypoints(maps: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K, S, S) heatmap logits of N boxes (N, 4) -> keypoints (N, K, 3) = (x, y, 1) and scores (N, K).

    Each box's maps are resized bicubically to the box's size in whole pixels (ceil of width and height),
    the keypoint is the centre of the highest pixel (a discrete position d is the continuous d + 0.5,
    Heckbert 1990), scaled back by the rounding of the box size; its score is the resized logit there."""
    maps, boxes = maps.float(), boxes.float()
    n, k = maps.shape[:2]
    keypoints = torch.zeros((n, k, 3), dtype=torch.float32, device=maps.device)
    scores = torch.zeros((n, k), dtype=torch.float32, device=maps.device)
    widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=1)
    heights = (boxes[:, 3] - boxes[:, 1]).clamp(min=1)
    widths_ceil, heights_ceil = widths.ceil(), heights.ceil()
    keypoint_index = torch.arange(k, device=maps.device)
    for i in range(n):  # every box has its own output size
        w, h = int(widths_ceil[i].item()), int(heights_ceil[i].item())
        roi_map = F.interpolate(maps[i][:, None], size=(h, w), mode="bicubic", align_corners=False)[:, 0]
        pos = roi_map.reshape(k, -1).argmax(dim=1)
        x_int = pos % w
        y_int = torch.div(pos - x_int, w, rounding_mode="floor")
        keypoints[i, :, 0] = (x_int.float() + 0.5) * (widths[i] / w) + boxes[i, 0]
        keypoints[i, :, 1] = (y_int.float() + 0.5) * (heights[i] / h) + boxes[i, 1]
        keypoints[i, :, 2] = 1
        scores[i] = roi_map[keypoint_index, y_int, x_int]
    return keypoints, scores


def heatmap_targets(keypoints: torch.Tensor, rois: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth keypoints (N, K, 3) of N RoIs (N, 4) -> the flat index y * size + x of the heatmap cell
    each falls in (N, K) and whether it counts (N, K) bool: visible (v > 0) and inside its RoI. A keypoint
    on the RoI's right or bottom edge goes to the last cell (torchvision's keypoints_to_heatmap)."""
    offset_x, offset_y = rois[:, 0:1], rois[:, 1:2]
    scale_x = size / (rois[:, 2:3] - rois[:, 0:1])
    scale_y = size / (rois[:, 3:4] - rois[:, 1:2])
    x, y = keypoints[..., 0], keypoints[..., 1]
    x_edge, y_edge = x == rois[:, 2:3], y == rois[:, 3:4]
    x = ((x - offset_x) * scale_x).floor().long()
    y = ((y - offset_y) * scale_y).floor().long()
    x[x_edge] = size - 1
    y[y_edge] = size - 1
    valid = (x >= 0) & (y >= 0) & (x < size) & (y < size) & (keypoints[..., 2] > 0)
    return (y * size + x) * valid, valid
