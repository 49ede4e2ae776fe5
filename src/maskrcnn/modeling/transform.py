"""Images in, one padded batch out (and detections back to input pixels at the end)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ImageTransform(nn.Module):
    """Normalise with the backbone's mean/std, resize so the shorter side is `min_size` unless the longer
    would exceed `max_size`, and pad to a common size divisible by 32 (the coarsest FPN stride)."""

    def __init__(self, min_size: int | tuple[int, ...] = 800, max_size: int = 1333,
                 mean: tuple[float, ...] = (0.485, 0.456, 0.406), std: tuple[float, ...] = (0.229, 0.224, 0.225),
                 size_divisible: int = 32, resize_in_training: bool = True):
        super().__init__()
        self.min_size = (min_size,) if isinstance(min_size, int) else tuple(min_size)
        self.max_size = max_size
        self.size_divisible = size_divisible
        self.resize_in_training = resize_in_training
        self.register_buffer("mean", torch.tensor(mean).reshape(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(-1, 1, 1), persistent=False)

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        """Returns (batch (N,3,H,W), sizes after resize [(h,w)], targets with boxes/masks resized)."""
        out_images, sizes, out_targets = [], [], []
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"image {i}: expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
            image = self.normalize(image)
            target = targets[i] if targets is not None else None
            if not self.training or self.resize_in_training:
                image, target = self.resize(image, target)
            out_images.append(image)
            sizes.append((image.shape[-2], image.shape[-1]))
            out_targets.append(target)
        return self.batch(out_images), sizes, (out_targets if targets is not None else None)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)

    def resized_size(self, height: int, width: int, min_size: int | None = None) -> tuple[int, int]:
        """(height, width) after resizing by the factor that brings the shorter side to `min_size` (None: the
        last of the configured ones) unless the longer would then exceed max_size; rounded down."""
        min_size = self.min_size[-1] if min_size is None else min_size
        scale = min(float(min_size) / min(height, width), float(self.max_size) / max(height, width))
        return int(height * scale), int(width * scale)

    def resize(self, image: torch.Tensor, target: dict | None = None):
        h, w = image.shape[-2:]
        min_size = None
        if self.training and len(self.min_size) > 1:
            min_size = self.min_size[int(torch.randint(len(self.min_size), ()).item())]
        image = F.interpolate(image[None], size=self.resized_size(h, w, min_size), mode="bilinear",
                              align_corners=False)[0]
        if target is not None:
            target = dict(target)
            ratio_h = torch.tensor(image.shape[-2], dtype=torch.float32) / h
            ratio_w = torch.tensor(image.shape[-1], dtype=torch.float32) / w
            if "boxes" in target:
                target["boxes"] = target["boxes"] * torch.stack((ratio_w, ratio_h, ratio_w, ratio_h)).to(
                    target["boxes"].device)
            if "keypoints" in target:
                target["keypoints"] = rescale_keypoints(target["keypoints"], (h, w), tuple(image.shape[-2:]))
            if "masks" in target and target["masks"].numel():
                target["masks"] = F.interpolate(target["masks"][:, None].float(), size=image.shape[-2:])[:, 0].byte()
            elif "masks" in target:
                target["masks"] = target["masks"].new_zeros((0, *image.shape[-2:]))
        return image, target

    def batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        d = self.size_divisible
        height = int(math.ceil(max(im.shape[-2] for im in images) / d) * d)
        width = int(math.ceil(max(im.shape[-1] for im in images) / d) * d)
        batch = images[0].new_zeros((len(images), images[0].shape[0], height, width))
        for slot, im in zip(batch, images):
            slot[:, : im.shape[-2], : im.shape[-1]].copy_(im)
        return batch


def rescale_boxes(boxes: torch.Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> torch.Tensor:
    ratio_h = torch.tensor(to_size[0], dtype=torch.float32, device=boxes.device) / from_size[0]
    ratio_w = torch.tensor(to_size[1], dtype=torch.float32, device=boxes.device) / from_size[1]
    x0, y0, x1, y1 = boxes.unbind(1)
    return torch.stack((x0 * ratio_w, y0 * ratio_h, x1 * ratio_w, y1 * ratio_h), dim=1)


def rescale_keypoints(keypoints: torch.Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> torch.Tensor:
    """(N, K, 3) keypoints (x, y, visibility): x and y scaled as `rescale_boxes` scales boxes."""
    ratio_h = torch.tensor(to_size[0], dtype=torch.float32, device=keypoints.device) / from_size[0]
    ratio_w = torch.tensor(to_size[1], dtype=torch.float32, device=keypoints.device) / from_size[1]
    return torch.stack((keypoints[..., 0] * ratio_w, keypoints[..., 1] * ratio_h, keypoints[..., 2]), dim=-1)
