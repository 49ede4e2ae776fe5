"""ResNet body (He et al. 2016) returning the outputs of its four stages, C2–C5 (strides 4–32)."""

from __future__ import annotations

import torch
from torch import nn

from .layers import conv_norm, make_norm

# depth -> (block kind, blocks per stage)
RESNET_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}


def _conv(in_ch: int, out_ch: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=k // 2, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, norm: str):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1, self.bn1 = _conv(in_ch, width, 3, stride), make_norm(norm, width)
        self.conv2, self.bn2 = _conv(width, out_ch, 3), make_norm(norm, out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride, norm)

    def forward(self, x: torch.Tensor, folding: str) -> torch.Tensor:
        identity = x if self.downsample is None else conv_norm(self.downsample[0], self.downsample[1], x, folding)
        out = self.relu(conv_norm(self.conv1, self.bn1, x, folding))
        out = conv_norm(self.conv2, self.bn2, out, folding)
        out += identity  # in place: one activation-sized allocation fewer (autograd checks it is safe)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, the "ResNet v1.5" placement), 1x1 expand."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, norm: str):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1, self.bn1 = _conv(in_ch, width, 1), make_norm(norm, width)
        self.conv2, self.bn2 = _conv(width, width, 3, stride), make_norm(norm, width)
        self.conv3, self.bn3 = _conv(width, out_ch, 1), make_norm(norm, out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, out_ch, stride, norm)

    def forward(self, x: torch.Tensor, folding: str) -> torch.Tensor:
        identity = x if self.downsample is None else conv_norm(self.downsample[0], self.downsample[1], x, folding)
        out = self.relu(conv_norm(self.conv1, self.bn1, x, folding))
        out = self.relu(conv_norm(self.conv2, self.bn2, out, folding))
        out = conv_norm(self.conv3, self.bn3, out, folding)
        out += identity  # in place: one activation-sized allocation fewer (autograd checks it is safe)
        return self.relu(out)


def _shortcut(in_ch: int, out_ch: int, stride: int, norm: str) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(_conv(in_ch, out_ch, 1, stride), make_norm(norm, out_ch))


class ResNet(nn.Module):
    """ResNet without its classifier. `frozen_stages` stops gradients to the stem and the first stages,
    which barely change during fine-tuning and cost memory to train."""

    def __init__(self, depth: int = 50, norm: str = "frozen_bn", frozen_stages: int = 0):
        super().__init__()
        if depth not in RESNET_STAGES:
            raise ValueError(f"ResNet depth must be one of {sorted(RESNET_STAGES)}, got {depth}")
        if norm is None:
            raise ValueError("the ResNet backbone needs a normalisation (frozen_bn, bn or gn)")
        kind, blocks = RESNET_STAGES[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = make_norm(norm, 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch, self.out_channels = 64, []
        for stage, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
            stride = 1 if stage == 1 else 2
            layers = []
            for i in range(n):
                layers.append(block(in_ch, width, stride if i == 0 else 1, norm))
                in_ch = width * block.expansion
            self.add_module(f"layer{stage}", nn.Sequential(*layers))
            self.out_channels.append(in_ch)
        self._init_weights()
        self.freeze(frozen_stages)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def freeze(self, stages: int) -> None:
        """Stage 0 is nothing; 1 is the stem; 2 the stem and layer1; ... 5 everything."""
        parts = [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3], [self.layer4]]
        for group in parts[:stages]:
            for module in group:
                for p in module.parameters():
                    p.requires_grad_(False)

    def forward(self, x: torch.Tensor, folding: str) -> list[torch.Tensor]:
        """`folding`: how the fixed-statistics norms are applied (plan.NORM_FOLDING; see layers.conv_norm)."""
        x = self.maxpool(self.relu(conv_norm(self.conv1, self.bn1, x, folding)))
        outputs = []
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x, folding)
            outputs.append(x)
        return outputs  # [c2, c3, c4, c5]
