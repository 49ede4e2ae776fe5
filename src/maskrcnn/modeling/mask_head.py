"""Mask branch: pooled 14x14 features -> convs -> 2x upsampling -> one 28x28 mask logit map per class."""

from __future__ import annotations

import torch
from torch import nn

from .layers import ConvNormAct, full_precision


class MaskHead(nn.Module):
    def __init__(self, in_channels: int, channels: int = 256, num_convs: int = 4, norm: str | None = None):
        super().__init__()
        self.convs = nn.Sequential(*(ConvNormAct(in_channels if i == 0 else channels, channels, 3, norm=norm)
                                     for i in range(num_convs)))
        self.out_channels = channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class MaskPredictor(nn.Module):
    """Predicts a mask for every class; only the detected class's mask is used (no competition between
    classes, which the Mask R-CNN paper found matters)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, channels, 2, stride=2)
        self.logits = nn.Conv2d(channels, num_classes, 1)
        for m in (self.upsample, self.logits):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return full_precision(self.logits, torch.relu(self.upsample(x)))
