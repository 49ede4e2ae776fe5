"""Feature pyramid (Lin et al. 2017): P2–P5 from lateral 1x1 convs plus a top-down pathway, P6 by pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvNormAct

# How many of the FPN's outputs RoIAlign pools from: P2..P5; P6 only feeds the RPN.
POOLED_LEVELS = 4


def pooled_levels(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """The levels the box and mask heads pool from: [P2..P6] -> [P2..P5]."""
    return features[:POOLED_LEVELS]


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int = 256, norm: str | None = None):
        super().__init__()
        self.out_channels = out_channels
        self.lateral = nn.ModuleList(ConvNormAct(c, out_channels, 1, norm=norm, relu=False) for c in in_channels)
        self.output = nn.ModuleList(
            ConvNormAct(out_channels, out_channels, 3, norm=norm, relu=False) for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor], folding: str) -> list[torch.Tensor]:
        """[C2..C5] -> [P2, P3, P4, P5, P6]; P6 only feeds the RPN (anchors of size 512). `folding`: how
        a fixed-statistics norm is applied (plan.NORM_FOLDING)."""
        top = self.lateral[-1](features[-1], folding)
        outputs = [self.output[-1](top, folding)]
        for level in range(len(features) - 2, -1, -1):
            lateral = self.lateral[level](features[level], folding)
            top = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.output[level](top, folding))
        outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs
