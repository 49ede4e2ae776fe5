"""From head outputs to final detections: per-class boxes, score filter, NMS, and masks pasted into the image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms

from .boxes import BoxCoder, clip_boxes, nonempty


def select_detections(class_logits: torch.Tensor, box_deltas: torch.Tensor, proposals: list[torch.Tensor],
                      image_sizes: list[tuple[int, int]], box_coder: BoxCoder, *, score_thresh: float,
                      nms_thresh: float, detections_per_img: int) -> list[dict[str, torch.Tensor]]:
    """Every (proposal, foreground class) pair is a candidate detection; keep those above `score_thresh`,
    suppress overlaps within each class, and keep the `detections_per_img` best. Each detection also
    records the index of the proposal it was refined from (`proposal_index`)."""
    num_classes = class_logits.shape[-1]
    counts = [len(p) for p in proposals]
    boxes_all = box_coder.decode(box_deltas, torch.cat(proposals)).split(counts)
    scores_all = F.softmax(class_logits, -1).split(counts)
    results = []
    for boxes, scores, size in zip(boxes_all, scores_all, image_sizes):
        boxes = clip_boxes(boxes, size)[:, 1:].reshape(-1, 4)  # drop the background class
        labels = torch.arange(1, num_classes, device=scores.device).repeat(len(scores))
        source = torch.arange(len(scores), device=scores.device).repeat_interleave(num_classes - 1)
        scores = scores[:, 1:].reshape(-1)
        keep = torch.where(scores > score_thresh)[0]
        boxes, scores, labels, source = boxes[keep], scores[keep], labels[keep], source[keep]
        keep = nonempty(boxes, 1e-2)
        boxes, scores, labels, source = boxes[keep], scores[keep], labels[keep], source[keep]
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
        results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep],
                        "proposal_index": source[keep]})
    return results


MASK_PASTE_MODES = ("torchvision", "exact")


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int],
                padding: int = 1, mode: str = "torchvision") -> torch.Tensor:
    """Resize each (M, M) mask into its box and place it in an image-sized canvas: (N, M, M) -> (N, H, W).

    The mask is first padded by one zero pixel (and the box grown to match) so that the resized mask fades
    out at the box border instead of being cut off. Bilinear resizing is separable, so each mask is
    pasted as R_y @ mask @ R_x^T with small interpolation matrices — one batched matmul for all masks
    instead of one interpolate call per mask.

    mode "torchvision" rounds the grown box to whole pixels (one pixel wider than the box) with the same
    sampling positions as torchvision, for bit-level parity. Mode "exact" puts the mask, to the sub-pixel,
    over the region its training target was cut from: RoIAlign with aligned=False (Mask R-CNN's
    convention, which torchvision's weights need) reads pixel i's value at coordinate i rather than at
    its centre i + 0.5, so that region is the box moved half a pixel right and down. The rounding costs
    small objects most (segm AP 0.575 -> 0.607 with the same weights on the shapes recipe,
    benchmarks/README.md).
    """
    if mode not in MASK_PASTE_MODES:
        raise ValueError(f"unknown mask paste mode {mode!r}; choose one of {MASK_PASTE_MODES}")
    n, m = masks.shape[0], masks.shape[-1]
    height, width = image_size
    if n == 0:
        return masks.new_zeros((0, height, width))
    padded = F.pad(masks, (padding,) * 4)
    scale = (m + 2 * padding) / m
    if mode == "exact":
        grown_w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-3) * scale
        grown_h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-3) * scale
        cx = (boxes[:, 2] + boxes[:, 0]) * 0.5 + 0.5
        cy = (boxes[:, 3] + boxes[:, 1]) * 0.5 + 0.5
        rows = _exact_resize_matrix(cy - grown_h * 0.5, grown_h, m + 2 * padding, height, masks.dtype)
        cols = _exact_resize_matrix(cx - grown_w * 0.5, grown_w, m + 2 * padding, width, masks.dtype)
        return rows @ padded @ cols.transpose(1, 2)
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    cx = (boxes[:, 2] + boxes[:, 0]) * 0.5
    cy = (boxes[:, 3] + boxes[:, 1]) * 0.5
    x0, x1 = (cx - half_w).to(torch.int64), (cx + half_w).to(torch.int64)
    y0, y1 = (cy - half_h).to(torch.int64), (cy + half_h).to(torch.int64)
    rows = _resize_matrix(y0, y1, m + 2 * padding, height, masks.dtype)
    cols = _resize_matrix(x0, x1, m + 2 * padding, width, masks.dtype)
    return rows @ padded @ cols.transpose(1, 2)


def _exact_resize_matrix(start: torch.Tensor, length: torch.Tensor, in_size: int, canvas: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """(N, canvas, in_size) bilinear weights: canvas pixel p (centre p + 0.5) reads the signal, which spans
    [start, start + length) in continuous coordinates, at (p + 0.5 - start) / length * in_size - 0.5.
    Positions are clamped to the signal's ends, which are the zero padding, so pixels outside read 0."""
    pos = torch.arange(canvas, device=start.device, dtype=torch.float32) + 0.5
    src = ((pos[None, :] - start[:, None].float()) / length[:, None].float() * in_size - 0.5).clamp(0, in_size - 1)
    lo = src.floor().to(torch.int64)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo
    weights = torch.zeros((len(start), canvas, in_size), dtype=torch.float32, device=start.device)
    weights.scatter_add_(2, lo[..., None], (1 - frac)[..., None])
    weights.scatter_add_(2, hi[..., None], frac[..., None])
    return weights.to(dtype)


def _resize_matrix(start: torch.Tensor, end: torch.Tensor, in_size: int, canvas: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """(N, canvas, in_size) weights that resize a length-`in_size` signal to the pixels start..end
    (inclusive) of a length-`canvas` line with bilinear, half-pixel-centre sampling; zero elsewhere."""
    out_size = (end - start + 1).clamp(min=1)
    pos = torch.arange(canvas, device=start.device)
    local = pos[None, :] - start[:, None]
    inside = (pos[None, :] >= start[:, None].clamp(min=0)) & (pos[None, :] <= end[:, None])
    step = in_size / out_size.to(torch.float32)
    src = ((local.to(torch.float32) + 0.5) * step[:, None] - 0.5).clamp(min=0)
    lo = src.to(torch.int64).clamp(max=in_size - 1)
    frac = (src - lo).clamp(0, 1)
    hi = torch.where(lo < in_size - 1, lo + 1, lo)
    weights = torch.zeros((len(start), canvas, in_size), dtype=torch.float32, device=start.device)
    inside_f = inside.to(torch.float32)
    weights.scatter_add_(2, lo[..., None], ((1 - frac) * inside_f)[..., None])
    weights.scatter_add_(2, hi[..., None], (frac * inside_f)[..., None])
    return weights.to(dtype)
