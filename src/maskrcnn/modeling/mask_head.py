"""Mask branch: pooled 14x14 features -> convs -> 2x upsampling -> one 28x28 mask logit map per class."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvNormAct, full_precision, init_relu_convs


class MaskHead(nn.Module):
    def __init__(self, in_channels: int, channels: int = 256, num_convs: int = 4, norm: str | None = None):
        super().__init__()
        self.convs = nn.Sequential(*(ConvNormAct(in_channels if i == 0 else channels, channels, 3, norm=norm)
                                     for i in range(num_convs)))
        self.out_channels = channels
        init_relu_convs(self)

    def forward(self, x: torch.Tensor, folding: str) -> torch.Tensor:
        """`folding`: how a fixed-statistics norm is applied (plan.NORM_FOLDING)."""
        for conv in self.convs:
            x = conv(x, folding)
        return x


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

    def forward(self, x: torch.Tensor, upsampling: str, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(K, C, 14, 14) -> logits for every class (K, classes, 28, 28), or with `labels` (K,) only each
        RoI's own class (K, 28, 28), which is all the training loss needs: one dot product per pixel
        instead of a classes-wide convolution and its backward. `upsampling`: plan.MASK_UPSAMPLING."""
        x = torch.relu(self._upsample(x, upsampling))
        if labels is None:
            return full_precision(self.logits, x)
        weight = self.logits.weight[labels, :, 0, 0].to(x.dtype)  # (K, C)
        k, c, h, w = x.shape
        if c > 1 and x.is_contiguous(memory_format=torch.channels_last):
            logits = torch.bmm(x.permute(0, 2, 3, 1).reshape(k, h * w, c), weight[:, :, None])  # a view: no copy
        else:
            logits = torch.bmm(weight[:, None, :], x.flatten(2))  # (K, 1, 28*28)
        return logits.reshape(k, h, w) + self.logits.bias[labels, None, None]

    def _upsample(self, x: torch.Tensor, upsampling: str) -> torch.Tensor:
        """The 2x2 stride-2 transposed conv. upsampling="pixel_shuffle" (training) runs it as the equivalent
        1x1 conv to 4x the channels + pixel shuffle (the same sums, ~1.6x faster with its backward on CPU);
        "transposed" (inference) keeps the transposed conv so that outputs stay bit-identical to
        torchvision's. (pixel_shuffle's backward fails on an empty batch, e.g. an image without positives:
        the transposed conv takes it.)"""
        if upsampling not in ("transposed", "pixel_shuffle"):
            raise ValueError(f"unknown mask upsampling {upsampling!r}; choose 'transposed' or 'pixel_shuffle'")
        if upsampling == "transposed" or len(x) == 0:
            return self.upsample(x)
        weight, bias = self.upsample.weight, self.upsample.bias  # (C_in, C_out, 2, 2), (C_out,)
        as_1x1 = weight.permute(1, 2, 3, 0).reshape(-1, weight.shape[0], 1, 1)  # (C_out*4, C_in, 1, 1)
        return F.pixel_shuffle(F.conv2d(x, as_1x1, bias.repeat_interleave(4)), 2)
