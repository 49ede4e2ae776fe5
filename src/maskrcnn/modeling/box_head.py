"""Box branch: pooled 7x7 features -> a vector -> class scores and class-specific box deltas."""

from __future__ import annotations

import torch
from torch import nn

from .layers import ConvNormAct, full_precision, init_relu_convs, make_norm


class MLPBoxHead(nn.Module):
    """Two fully connected layers (the original Mask R-CNN head), optionally each followed by a norm.

    Trained from scratch, BatchNorm after each layer let the classifier start telling the shapes apart
    earlier (segm AP 0.468 -> 0.508 on the shapes data, benchmarks/README.md): the 512 RoIs of a batch
    give it good statistics, and at inference it is a fixed affine map."""

    def __init__(self, in_channels: int, pooled_size: int = 7, hidden: int = 1024, norm: str | None = None):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * pooled_size ** 2, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm1 = make_norm(norm, hidden, vector=True)
        self.norm2 = make_norm(norm, hidden, vector=True)
        self.out_features = hidden

    def forward(self, x: torch.Tensor, folding: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(class features, box features): the same tensor twice, as every box head returns a pair.
        `folding` is unused (no conv here); every box head takes it."""
        features = self.vector(x)
        return features, features

    def vector(self, x: torch.Tensor) -> torch.Tensor:
        """The one (K, hidden) feature vector per RoI."""
        x = self.fc1(x.flatten(1))
        if self.norm1 is not None:
            x = self.norm1(x)
        x = self.fc2(torch.relu(x))
        if self.norm2 is not None:
            x = self.norm2(x)
        return torch.relu(x)


class SplitMLPBoxHead(nn.Module):
    """Two MLP heads on the same pooled features: one for the class scores, one for the box deltas.

    In the shared 2-fc head the regression and classification gradients pull one feature vector two
    ways; giving each task its own layers ("decoupled" heads, as in Double-Head R-CNN and YOLOX) made
    the classifier learn faster from scratch (segm AP +0.04 and +0.02 on two training seeds of the
    shapes recipe, benchmarks/README.md)."""

    def __init__(self, in_channels: int, pooled_size: int = 7, hidden: int = 1024, norm: str | None = None):
        super().__init__()
        self.classification = MLPBoxHead(in_channels, pooled_size, hidden, norm)
        self.regression = MLPBoxHead(in_channels, pooled_size, hidden, norm)
        self.out_features = hidden

    def forward(self, x: torch.Tensor, folding: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(class features, box features), for BoxPredictor. `folding` is unused (no conv here)."""
        return self.classification.vector(x), self.regression.vector(x)


class ConvFCBoxHead(nn.Module):
    """Four 3x3 convs with normalisation, then one fully connected layer (the "v2" head, Li et al. 2021)."""

    def __init__(self, in_channels: int, pooled_size: int = 7, conv_channels: int = 256, num_convs: int = 4,
                 hidden: int = 1024, norm: str | None = "bn"):
        super().__init__()
        self.convs = nn.Sequential(*(ConvNormAct(in_channels if i == 0 else conv_channels, conv_channels, 3,
                                                 norm=norm) for i in range(num_convs)))
        self.fc = nn.Linear(conv_channels * pooled_size ** 2, hidden)
        self.out_features = hidden
        init_relu_convs(self.convs)

    def forward(self, x: torch.Tensor, folding: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(class features, box features): the same tensor twice, as every box head returns a pair.
        `folding`: how a fixed-statistics norm is applied (plan.NORM_FOLDING)."""
        for conv in self.convs:
            x = conv(x, folding)
        features = torch.relu(self.fc(x.flatten(1)))
        return features, features


class BoxPredictor(nn.Module):
    """Class logits (background is class 0) and one set of box deltas per class."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.class_logits = nn.Linear(in_features, num_classes)
        self.box_deltas = nn.Linear(in_features, num_classes * 4)
        nn.init.normal_(self.class_logits.weight, std=0.01)
        nn.init.normal_(self.box_deltas.weight, std=0.001)
        nn.init.zeros_(self.class_logits.bias)
        nn.init.zeros_(self.box_deltas.bias)

    def forward(self, features: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """features: the box head's (class features, box features); one tensor twice for a shared head."""
        class_features, box_features = features
        if class_features is box_features:  # a shared head: converted to fp32 once for both layers
            return full_precision((self.class_logits, self.box_deltas), class_features)
        return full_precision(self.class_logits, class_features), full_precision(self.box_deltas, box_features)
