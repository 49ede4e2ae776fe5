"""Small building blocks shared by every stage: normalisation choice and conv + norm + ReLU."""

from __future__ import annotations

import torch
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm whose statistics and affine terms are constants.

    Fine-tuning uses 1–4 images per GPU; batch statistics that small would wreck the pretrained ones,
    so the backbone keeps them fixed (and they can later be folded into the preceding convolution).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written from a trainable BatchNorm carry a step counter we have no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


NORMS = ("frozen_bn", "bn", "gn", None)


def make_norm(kind: str | None, channels: int) -> nn.Module | None:
    """`frozen_bn` for fine-tuning, `bn` for large batches, `gn` (32 groups) for training from scratch."""
    if kind is None or kind == "none":
        return None
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"unknown normalisation {kind!r}; choose one of {NORMS}")


class ConvNormAct(nn.Sequential):
    """Convolution, optional normalisation, optional ReLU. The conv has a bias only without a norm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 dilation: int = 1, norm: str | None = None, relu: bool = True):
        super().__init__()
        norm_layer = make_norm(norm, out_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=dilation * (kernel_size - 1) // 2, dilation=dilation,
                              bias=norm_layer is None)
        if norm_layer is not None:
            self.norm = norm_layer
        if relu:
            self.relu = nn.ReLU(inplace=True)
