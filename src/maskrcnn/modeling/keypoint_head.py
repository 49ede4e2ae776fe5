"""Keypoint branch (Keypoint R-CNN, He et al. 2017 sec. 5): pooled 14x14 features -> eight 3x3 convs ->
transposed conv to 28x28 -> bilinear 2x upsampling -> one 56x56 heatmap logit map per keypoint."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import full_precision
from .mask_head import MaskHead


class KeypointHead(MaskHead):
    """The mask head's layout, deeper and wider: by default eight 3x3 convs of 512 channels with ReLU, no
    norm (torchvision's KeypointRCNNHeads); the from-scratch recipe uses fewer, narrower convs with
    BatchNorm. (K, C, 14, 14) -> (K, channels, 14, 14)."""

    def __init__(self, in_channels: int, channels: int = 512, num_convs: int = 8, norm: str | None = None):
        super().__init__(in_channels, channels, num_convs, norm)


class KeypointPredictor(nn.Module):
    """A 4x4 stride-2 transposed conv to one 28x28 logit map per keypoint, then bilinear 2x upsampling to
    56x56 (torchvision's KeypointRCNNPredictor: no ReLU between them)."""

    def __init__(self, in_channels: int, num_keypoints: int):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, num_keypoints, 4, stride=2, padding=1)
        nn.init.kaiming_normal_(self.upsample.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.upsample.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(K, C, 14, 14) -> (K, keypoints, 56, 56) heatmap logits, in float32 (their argmax places the
        keypoints: rounded to bfloat16, neighbouring positions tie)."""
        logits = full_precision(self.upsample, x)
        return F.interpolate(logits, scale_factor=2.0, mode="bilinear", align_corners=False,
                             recompute_scale_factor=False)
