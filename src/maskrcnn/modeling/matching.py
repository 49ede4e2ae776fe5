"""Training-time bookkeeping: which ground-truth box each anchor/proposal belongs to, and which to train on."""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

BACKGROUND = -1  # matched to nothing
IGNORED = -2     # overlap too ambiguous to call either way


def match_boxes(gt_boxes: torch.Tensor, boxes: torch.Tensor, fg_thresh: float, bg_thresh: float,
                keep_best_for_each_gt: bool) -> torch.Tensor:
    """Index of the best-overlapping ground-truth box for each box, or BACKGROUND / IGNORED.

    With `keep_best_for_each_gt` (the RPN), every ground-truth box also keeps the box(es) that overlap it
    most even below `fg_thresh`, so that small or oddly shaped objects still get a positive anchor.
    """
    if gt_boxes.numel() == 0:
        return torch.full((len(boxes),), BACKGROUND, dtype=torch.int64, device=boxes.device)
    iou = box_iou(gt_boxes, boxes)
    best_iou, matches = iou.max(dim=0)
    best_matches = matches.clone()
    matches[best_iou < bg_thresh] = BACKGROUND
    matches[(best_iou >= bg_thresh) & (best_iou < fg_thresh)] = IGNORED
    if keep_best_for_each_gt:
        best_for_gt = iou.max(dim=1, keepdim=True).values
        rescued = torch.where(iou == best_for_gt)[1]
        matches[rescued] = best_matches[rescued]
    return matches


def sample_balanced(labels: torch.Tensor, batch_size: int, positive_fraction: float,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random positive (label >= 1) and negative (label == 0) indices, at most `batch_size` in all and
    at most `positive_fraction` of them positive; easy negatives would otherwise swamp the loss."""
    positive = torch.where(labels >= 1)[0]
    negative = torch.where(labels == 0)[0]
    num_pos = min(int(batch_size * positive_fraction), positive.numel())
    num_neg = min(batch_size - num_pos, negative.numel())
    pos = positive[torch.randperm(positive.numel(), device=positive.device, generator=generator)[:num_pos]]
    neg = negative[torch.randperm(negative.numel(), device=negative.device, generator=generator)[:num_neg]]
    return pos, neg
