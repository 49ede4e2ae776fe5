"""RoIAlign over the FPN: each box is pooled from the one pyramid level that matches its size."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import roi_align


def level_of_boxes(boxes: torch.Tensor, min_level: int, max_level: int,
                   canonical_size: float = 224.0, canonical_level: int = 4) -> torch.Tensor:
    """FPN paper eq. 1: a 224x224 box goes to P4, each halving of its side one level down.
    Returns the index into [min_level, max_level] (0 = finest)."""
    side = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    level = torch.floor(canonical_level + torch.log2(side / canonical_size)
                        + torch.tensor(1e-6, dtype=side.dtype))
    return (level.clamp(min=min_level, max=max_level).to(torch.int64) - min_level)


def _feature_scale(feature_size: int, image_size: int) -> float:
    """The power of two closest to feature/image size. Read off the shapes rather than assumed from the
    strides so that tiny images, where padding makes the two differ, pool the same way as torchvision."""
    return 2.0 ** round(math.log2(feature_size / image_size))


class MultiLevelRoIAlign(nn.Module):
    def __init__(self, output_size: int, sampling_ratio: int = 2):
        super().__init__()
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio

    def forward(self, features: list[torch.Tensor], boxes: list[torch.Tensor],
                image_sizes: list[tuple[int, int]]) -> torch.Tensor:
        """features: P2..P5 (N, C, H, W); boxes: per image (K_i, 4) -> (sum K_i, C, S, S)."""
        max_height = max(h for h, _ in image_sizes)
        scales = [_feature_scale(f.shape[-2], max_height) for f in features]
        rois = torch.cat([torch.cat((torch.full_like(b[:, :1], i), b), dim=1) for i, b in enumerate(boxes)])
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, scales[0], self.sampling_ratio)
        min_level = round(-math.log2(scales[0]))
        max_level = round(-math.log2(scales[-1]))
        levels = level_of_boxes(rois[:, 1:], min_level, max_level)
        out = features[0].new_zeros((rois.shape[0], features[0].shape[1], self.output_size, self.output_size))
        for level, (feature, scale) in enumerate(zip(features, scales)):
            idx = torch.where(levels == level)[0]
            if idx.numel():
                out[idx] = roi_align(feature, rois[idx], self.output_size, scale, self.sampling_ratio).to(out.dtype)
        return out
