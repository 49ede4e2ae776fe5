"""Small building blocks shared by every stage: normalisation choice and conv + norm + ReLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def conv_norm(conv: nn.Conv2d, norm: nn.Module | None, x: torch.Tensor, folding: str) -> torch.Tensor:
    """norm(conv(x)), computed as `folding` (plan.NORM_FOLDING) says for a fixed-statistics norm.

    A frozen (or eval-mode) BatchNorm is an affine map per channel, so it can be absorbed into the conv
    before it: one pass over the activations instead of two. Folding is exact in real arithmetic but rounds
    differently, and on some inputs that moves a box by more than the 0.01 px we promise for torchvision
    parity, so fp32 inference keeps the norm "separate"."""
    if norm is None:
        return conv(x)
    foldable = isinstance(norm, FrozenBatchNorm2d) or (isinstance(norm, nn.BatchNorm2d) and not norm.training
                                                       and norm.track_running_stats)
    if not foldable:
        return norm(conv(x))
    if folding == "autograd":
        # Training (fine-tuning with a frozen backbone norm): fold on the fly, through autograd. The conv's
        # weight gradient then passes through one weight-sized multiply, while the two activation-sized
        # passes forward (scale, shift) and the one backward disappear: ~12% of a ResNet-50 step on CPU.
        weight, bias = _fold(conv, norm)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if folding == "separate":
        if isinstance(norm, FrozenBatchNorm2d):
            # The same two roundings as norm(conv(x)), so bit for bit the same result, but in place on the
            # conv's fresh output: no second activation-sized allocation (page faults) per layer.
            scale, shift = norm.scale_and_shift()
            return conv(x).mul_(scale.reshape(1, -1, 1, 1)).add_(shift.reshape(1, -1, 1, 1))
        return norm(conv(x))
    if folding != "cached":
        raise ValueError(f"unknown norm folding {folding!r}; choose 'separate', 'cached' or 'autograd'")
    # The folded weights are cached and rebuilt whenever the conv or norm tensors change (load_state_dict).
    weight, bias = _folded(conv, norm)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _folded(conv: nn.Conv2d, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = (conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var)
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None for t in tensors)
    cached = getattr(norm, "_folded_cache", None)
    if cached is None or cached[0] != key:
        weight, bias = _fold(conv, norm)
        weight = weight.contiguous(memory_format=torch.channels_last) if conv.weight.is_contiguous(
            memory_format=torch.channels_last) and conv.weight.shape[-1] > 1 else weight
        cached = (key, weight, bias)
        object.__setattr__(norm, "_folded_cache", cached)  # not a buffer: never saved, never moved by .to()
    return cached[1], cached[2]


def _fold(conv: nn.Conv2d, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the one conv equal to norm(conv(x)) for a frozen or eval-mode BatchNorm."""
    if isinstance(norm, FrozenBatchNorm2d):
        scale, shift = norm.scale_and_shift()
    else:
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        shift = norm.bias - norm.running_mean * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    return weight, shift if conv.bias is None else shift + conv.bias * scale


NORMS = ("frozen_bn", "bn", "gn", None)


def full_precision(layers: nn.Module | tuple[nn.Module, ...], x: torch.Tensor):
    """layer(x) in float32 even under autocast (a tuple of layers: a tuple of outputs, with x converted
    once). For the final prediction layers: logits rounded to bfloat16 (8 significant bits) tie and swap
    places in the top-k and NMS orderings, which changes which proposals and detections survive; these
    layers are a tiny share of the compute."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return full_precision(layers, x.float())
    if isinstance(layers, tuple):
        return tuple(layer(x) for layer in layers)
    return layers(x)


def init_relu_convs(module: nn.Module) -> None:
    """He-normal (fan_out) weights and zero biases for every Conv2d in `module`, for convs followed by ReLU
    (the box and mask heads)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def make_norm(kind: str | None, channels: int, vector: bool = False) -> nn.Module | None:
    """`frozen_bn` for fine-tuning, `bn` for large batches, `gn` (32 groups) for training from scratch.
    `vector=True` normalises (N, C) features, those of the mlp box head: `bn` is BatchNorm1d, no `frozen_bn`."""
    if kind is None or kind == "none":
        return None
    if kind == "frozen_bn" and not vector:
        return FrozenBatchNorm2d(channels)
    if kind == "bn":
        return nn.BatchNorm1d(channels) if vector else nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(32, channels)
    if vector:
        raise ValueError(f"unknown normalisation {kind!r} for the mlp box head; choose 'bn', 'gn' or None")
    raise ValueError(f"unknown normalisation {kind!r}; choose one of {NORMS}")


class ConvNormAct(nn.Module):
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

    def forward(self, x: torch.Tensor, folding: str) -> torch.Tensor:
        """`folding`: how a fixed-statistics norm is applied (plan.NORM_FOLDING; see conv_norm)."""
        x = conv_norm(self.conv, getattr(self, "norm", None), x, folding)
        return torch.relu_(x) if hasattr(self, "relu") else x
