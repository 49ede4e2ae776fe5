"""From head outputs to final detections: per-class boxes, score filter, NMS, and masks pasted into the image."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .boxes import BoxCoder, clip_boxes, nms_per_group, nonempty
from .transform import rescale_boxes, rescale_keypoints


def select_detections(class_logits: torch.Tensor, box_deltas: torch.Tensor, proposals: list[torch.Tensor],
                      image_sizes: list, box_coder: BoxCoder, *, score_thresh, nms_thresh: float,
                      detections_per_img, traceable: bool = False) -> list[dict[str, torch.Tensor]]:
    """Every (proposal, foreground class) pair is a candidate detection; keep those above `score_thresh`,
    suppress overlaps within each class, and keep the `detections_per_img` best. Each detection also
    records the index of the proposal it was refined from (`proposal_index`).

    traceable=True (an exported graph, one image): the image size is a (2,) float tensor and score_thresh
    and detections_per_img are 0-d tensors (graph inputs), so counts are read with tensor ops."""
    num_classes = class_logits.shape[-1]
    boxes_all = box_coder.decode(box_deltas, torch.cat(proposals))
    scores_all = F.softmax(class_logits, -1)
    if len(proposals) > 1:  # the number of images, not data: a trace of one image has no split
        counts = [len(p) for p in proposals]
        boxes_all, scores_all = boxes_all.split(counts), scores_all.split(counts)
    else:
        boxes_all, scores_all = [boxes_all], [scores_all]
    results = []
    for boxes, scores, size in zip(boxes_all, scores_all, image_sizes):
        boxes = clip_boxes(boxes, size)[:, 1:].reshape(-1, 4)  # drop the background class
        scores = scores[:, 1:].reshape(-1)
        # candidate i is (proposal i // (classes - 1), class i % (classes - 1) + 1)
        candidate = torch.arange(scores.shape[0], device=scores.device)
        labels, source = candidate % (num_classes - 1) + 1, candidate // (num_classes - 1)
        keep = torch.where(scores > score_thresh)[0]
        boxes, scores, labels, source = boxes[keep], scores[keep], labels[keep], source[keep]
        keep = nonempty(boxes, 1e-2)
        boxes, scores, labels, source = boxes[keep], scores[keep], labels[keep], source[keep]
        keep = _first(nms_per_group(boxes, scores, labels, nms_thresh, size, traceable), detections_per_img,
                      traceable)
        results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep],
                        "proposal_index": source[keep]})
    return results


def _first(indices: torch.Tensor, n, traceable: bool) -> torch.Tensor:
    """indices[:n]; with `traceable`, n is a 0-d tensor (a graph input), which a slice would freeze."""
    if traceable:
        return indices[torch.arange(indices.shape[0], device=indices.device) < n]
    return indices[:n]


def to_input_pixels(det: dict, size: tuple[int, int], original: tuple[int, int], paste_mode: str,
                    masks: str = "image", mask_threshold: float | None = None) -> dict:
    """One image's detections in the resized image's pixels (boxes, labels, scores, `mask_probs` (K, M, M))
    -> in the input image's: boxes rescaled, masks pasted in `paste_mode` into full (K, 1, H, W) `masks`, or
    with masks="crops" into `mask_crops`, `mask_offsets` and `image_size` (see `MaskRCNN.predict`). The
    last step of both the eager model and the exported one (`maskrcnn.export.runtime`). Keypoints
    (`keypoints`, `keypoints_scores`) are rescaled too; without `mask_probs` there are no masks."""
    boxes = rescale_boxes(det["boxes"], size, original)
    out = {"boxes": boxes, "labels": det["labels"], "scores": det["scores"]}
    if "keypoints" in det:  # a keypoint branch's (K, keypoints, 3) and (K, keypoints)
        out["keypoints"] = rescale_keypoints(det["keypoints"], size, original)
        out["keypoints_scores"] = det["keypoints_scores"]
    if "mask_probs" not in det:  # a model without a mask branch
        return {**out, "image_size": original} if masks == "crops" else out
    if masks == "crops":
        crops, offsets = paste_masks_in_crops(det["mask_probs"], boxes, original, mode=paste_mode,
                                              threshold=mask_threshold)
        return {**out, "mask_crops": crops, "mask_offsets": offsets, "image_size": original}
    return {**out, "masks": paste_masks(det["mask_probs"], boxes, original, mode=paste_mode)[:, None]}


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
    spans = paste_spans(boxes, m, padding, mode)
    rows = _paste_matrix(spans, 1, height, m + 2 * padding, masks.dtype)
    cols = _paste_matrix(spans, 0, width, m + 2 * padding, masks.dtype)
    return rows @ padded @ cols.transpose(1, 2)


def paste_masks_in_crops(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int],
                         padding: int = 1, mode: str = "torchvision",
                         threshold: float | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`paste_masks` without keeping the image-sized canvases: for each mask only the part of the image where
    its pasted values can be non-zero, as ([(h_i, w_i) tensors], (N, 2) int64 (y, x) offsets of their
    top-left pixels, on the CPU). Memory is one canvas at a time plus the crops, instead of N canvases.
    With a `threshold`, the crops are boolean masks (value >= threshold) rather than probabilities; a
    threshold <= 0, which the zeros outside pass, makes every crop the whole image.

    Each mask is pasted with exactly the matmuls `paste_masks` runs for it (one (H, 30) @ (30, 30) @ (30, W)
    slice of its batch), so every value is the same bit for bit: matmuls restricted to the crop's rows and
    columns would be cheaper but BLAS picks other kernels (another summation order) for thin matrices."""
    if mode not in MASK_PASTE_MODES:
        raise ValueError(f"unknown mask paste mode {mode!r}; choose one of {MASK_PASTE_MODES}")
    n, m = masks.shape[0], masks.shape[-1]
    height, width = image_size
    if n == 0:
        return [], torch.zeros((0, 2), dtype=torch.int64)
    spans = paste_spans(boxes, m, padding, mode)
    if threshold is not None and threshold <= 0:  # the zeros outside the crops pass it too: whole image
        bounds = [(0, height)] * n, [(0, width)] * n
    else:
        bounds = [_crop_bounds(spans[2 * axis], spans[2 * axis + 1], size, mode == "exact")
                  for axis, size in ((1, height), (0, width))]
    crops = []
    for i, ((top, bottom), (left, right)) in enumerate(zip(*bounds)):
        if bottom <= top or right <= left:
            crops.append(masks.new_zeros((max(bottom - top, 0), max(right - left, 0)),
                                         dtype=None if threshold is None else torch.bool))
            continue
        crop = paste_masks(masks[i:i + 1], boxes[i:i + 1], image_size, padding, mode)[0, top:bottom, left:right]
        crops.append(crop.clone() if threshold is None else crop >= threshold)
        del crop  # frees the canvas before the next one is made
    offsets = [[top, left] for (top, _), (left, _) in zip(*bounds)]
    return crops, torch.tensor(offsets, dtype=torch.int64).reshape(-1, 2)


def paste_spans(boxes: torch.Tensor, m: int, padding: int, mode: str) -> tuple[torch.Tensor, ...]:
    """Where each padded mask goes, per axis (x, then y): mode "exact" (x start, x length, y start, y length)
    in continuous coordinates; mode "torchvision" (x0, x1, y0, y1), whole pixels, inclusive."""
    scale = (m + 2 * padding) / m
    if mode == "exact":
        grown_w = (boxes[:, 2] - boxes[:, 0]).clamp(min=1e-3) * scale
        grown_h = (boxes[:, 3] - boxes[:, 1]).clamp(min=1e-3) * scale
        cx = (boxes[:, 2] + boxes[:, 0]) * 0.5 + 0.5
        cy = (boxes[:, 3] + boxes[:, 1]) * 0.5 + 0.5
        return cx - grown_w * 0.5, grown_w, cy - grown_h * 0.5, grown_h
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    cx = (boxes[:, 2] + boxes[:, 0]) * 0.5
    cy = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return ((cx - half_w).to(torch.int64), (cx + half_w).to(torch.int64),
            (cy - half_h).to(torch.int64), (cy + half_h).to(torch.int64))


def _paste_matrix(spans: tuple[torch.Tensor, ...], axis: int, canvas: int, in_size: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """The interpolation weights of one axis (0: x, 1: y) onto a `canvas`-pixel line; `spans` says the mode."""
    a, b = spans[2 * axis], spans[2 * axis + 1]
    if a.dtype == torch.int64:
        return _resize_matrix(a, b, in_size, canvas, dtype)
    return _exact_resize_matrix(a, b, in_size, canvas, dtype)


def _crop_bounds(first: torch.Tensor, last: torch.Tensor, canvas: int, exact: bool) -> list[tuple[int, int]]:
    """Per mask, the pixels [begin, end) of one canvas axis outside which its pasted values are all 0, from
    its span on that axis (any device): whole pixels `first`..`last` inclusive, or with
    `exact`, the sub-pixel span starting at `first` of length `last`.

    Whole-pixel spans are exact. For a sub-pixel span, a pixel whose centre p + 0.5 is at or before the
    start reads position <= -0.5 (clamped onto the zero padding), and one a pixel and a half or more past
    the end reads >= in_size - 0.5 (the zero padding again), so a pixel of margin either side covers every
    pixel that can be non-zero whatever the float32 rounding."""
    first, last = (t.detach().cpu().numpy() for t in (first, last))
    if exact:
        start, end = first.astype(np.float64), first.astype(np.float64) + last.astype(np.float64)
        begin, stop = np.floor(start).astype(np.int64) - 1, np.ceil(end).astype(np.int64) + 2
    else:
        begin, stop = first.astype(np.int64), last.astype(np.int64) + 1
    return [(min(max(b, 0), canvas), max(min(e, canvas), 0)) for b, e in zip(begin.tolist(), stop.tolist())]


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
