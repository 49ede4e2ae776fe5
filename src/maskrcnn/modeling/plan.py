"""How the stages compute: one explicit choice, made where the model is called, passed down the stages.

The same weights can run in three ways. Predicting in fp32 reproduces torchvision bit for bit; predicting in
fp32-fast/bf16/fp16 gives that up for speed; training needs gradients and takes the paths that are fast with their
backward. Each stage receives the field it depends on as an argument, so reading a call tells what runs."""

from __future__ import annotations

from dataclasses import dataclass

# MaskRCNN.precision, the arithmetic of inference; "auto" picks one per device (maskrcnn/precision.py)
PRECISIONS = ("fp32", "fp32-fast", "bf16", "fp16")

# conv + norm (layers.conv_norm), for a fixed-statistics norm:
#   "separate"  norm(conv(x)) with torchvision's two roundings (in place on the conv's output)
#   "cached"    the norm folded into the conv's weights once and reused (rounds differently)
#   "autograd"  folded on every call, through autograd (training: gradients reach the conv's weight)
NORM_FOLDING = ("separate", "cached", "autograd")
# RoIAlign (poolers.roi_align): torchvision's kernel, or our sparse matmul where it applies (on CPU, with a
# fixed sampling ratio: multithreaded, free of copies on channels-last maps, ~1e-6 from torchvision's)
ROI_ALIGN_KERNELS = ("torchvision", "sparse")
# the mask predictor's logits: every class (as torchvision), or only each RoI's detected / true class
MASK_CLASSES = ("all", "detected")
# the mask predictor's 2x upsampling: the transposed conv (torchvision's sums), or the equivalent 1x1 conv
# + pixel shuffle (the same sums in another order, faster with its backward on CPU)
MASK_UPSAMPLING = ("transposed", "pixel_shuffle")


@dataclass(frozen=True)
class Plan:
    """One value per choice above; the defaults are torchvision's arithmetic (TORCHVISION)."""

    norms: str = "separate"
    roi_align: str = "torchvision"
    mask_classes: str = "all"
    mask_upsampling: str = "transposed"
    channels_last: bool = False       # the image batch (so the backbone and FPN) in channels-last layout
    mask_head_channels_last: bool = False

    def __post_init__(self):
        for name, allowed in (("norms", NORM_FOLDING), ("roi_align", ROI_ALIGN_KERNELS),
                              ("mask_classes", MASK_CLASSES), ("mask_upsampling", MASK_UPSAMPLING)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"plan {name} must be one of {allowed}, got {getattr(self, name)!r}")


# fp32 inference: torchvision's arithmetic throughout, bit-identical outputs.
TORCHVISION = Plan()
# fp32-fast / bf16 / fp16 inference: already off bit-level parity, so every faster path. Channels-last lets oneDNN /
# cuDNN run half-width convolutions without a layout reorder around each one; the mask head's four 3x3
# convs are ~20% of a ResNet-50 model's FLOPs, so channels-last for them too.
FAST_INFERENCE = Plan(norms="cached", roi_align="sparse", mask_classes="detected", channels_last=True,
                      mask_head_channels_last=True)


def inference_plan(precision: str) -> Plan:
    """"fp32" -> TORCHVISION; "fp32-fast" / "bf16" / "fp16" -> FAST_INFERENCE."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return TORCHVISION if precision == "fp32" else FAST_INFERENCE


def training_plan(device_type: str) -> Plan:
    """Training: the paths that are fast with their backward. On CPU, oneDNN's channels-last convolutions
    train ~1.4x faster than NCHW ones (forward and backward; benchmarks/README.md), and the sparse RoIAlign
    reads channels-last feature rows without a copy. The mask loss needs only each RoI's true class."""
    return Plan(norms="autograd", roi_align="sparse", mask_classes="detected", mask_upsampling="pixel_shuffle",
                channels_last=device_type == "cpu")
