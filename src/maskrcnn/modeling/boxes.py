"""Box arithmetic: regression deltas (dx, dy, dw, dh) relative to a reference box, clipping, the size filter
and NMS within groups."""

from __future__ import annotations

import math

import torch
from torchvision.ops import batched_nms, nms


class BoxCoder:
    """Encodes boxes as offsets from reference boxes and back.

    `weights` scale the four deltas so that both regression targets have roughly unit variance;
    `max_log_scale` stops exp(dw) from overflowing on wild predictions early in training.
    """

    def __init__(self, weights: tuple[float, float, float, float],
                 max_log_scale: float = math.log(1000.0 / 16)):
        self.weights = weights
        self.max_log_scale = max_log_scale

    def encode(self, boxes: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """(N, 4) boxes and (N, 4) reference boxes -> (N, 4) deltas."""
        wx, wy, ww, wh = self.weights
        ref_w = reference[:, 2:3] - reference[:, 0:1]
        ref_h = reference[:, 3:4] - reference[:, 1:2]
        ref_x = reference[:, 0:1] + 0.5 * ref_w
        ref_y = reference[:, 1:2] + 0.5 * ref_h
        w = boxes[:, 2:3] - boxes[:, 0:1]
        h = boxes[:, 3:4] - boxes[:, 1:2]
        x = boxes[:, 0:1] + 0.5 * w
        y = boxes[:, 1:2] + 0.5 * h
        return torch.cat((wx * (x - ref_x) / ref_w, wy * (y - ref_y) / ref_h,
                          ww * torch.log(w / ref_w), wh * torch.log(h / ref_h)), dim=1)

    def decode(self, deltas: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """(N, K*4) deltas (K boxes per reference, e.g. one per class) and (N, 4) reference -> (N, K, 4)."""
        reference = reference.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = reference[:, 2] - reference[:, 0]
        heights = reference[:, 3] - reference[:, 1]
        ctr_x = reference[:, 0] + 0.5 * widths
        ctr_y = reference[:, 1] + 0.5 * heights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.max_log_scale)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.max_log_scale)
        x = dx * widths[:, None] + ctr_x[:, None]
        y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * (torch.exp(dw) * widths[:, None])
        half_h = 0.5 * (torch.exp(dh) * heights[:, None])
        return torch.stack((x - half_w, y - half_h, x + half_w, y + half_h), dim=2)


def clip_boxes(boxes: torch.Tensor, image_size) -> torch.Tensor:
    """Clamp xyxy boxes (any leading shape) to an image of (height, width): two ints, or a (2,) float tensor
    (an exported graph's input, which a trace keeps as a value rather than freezing it)."""
    h, w = image_size[0], image_size[1]
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def nonempty(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    """Indices of boxes at least `min_size` wide and high."""
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)
    return torch.where(keep)[0]


def nms_per_group(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_thresh: float,
                  image_size, traceable: bool = False) -> torch.Tensor:
    """NMS within each group (class or pyramid level): indices of the kept boxes, best score first.

    traceable=False: torchvision's batched_nms, which picks its method by the number of boxes (the parity
    path). traceable=True, for an exported graph: boxes clipped to `image_size` (a (2,) tensor) are kept
    apart by shifting each group by more than the image is wide and high, one NMS over all. (torchvision's
    batched_nms measures that shift with boxes.max() behind an `if` on the box count, which a trace freezes,
    and max() fails on no boxes.)"""
    if not traceable:
        return batched_nms(boxes, scores, groups, iou_thresh)
    offsets = groups.to(boxes.dtype)[:, None] * (image_size.max() + 1)
    return nms(boxes + offsets, scores, iou_thresh)
