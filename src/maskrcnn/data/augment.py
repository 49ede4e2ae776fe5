"""Training augmentation on (image, target) pairs, and aspect-ratio-grouped batching.

Every random choice is drawn from a `torch.Generator` passed to the call (torch's global RNG when it
is None), so a run can be reproduced, and resumed mid-way, from a seed alone.

Images are (3,H,W) float tensors; targets are dicts with `boxes` (N,4) xyxy pixels, `labels` (N,)
and optionally `masks` (N,H,W) and `keypoints` (N,K,3: x, y in pixels, COCO visibility v; a keypoint with
v = 0 has x = y = 0, as in COCO). Other keys pass through untouched. Transforms return a new target dict
and never modify the one they were given.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Target entries with one row per instance: they are indexed together when instances are dropped.
PER_INSTANCE_KEYS = ("boxes", "labels", "masks", "keypoints")


def derive_seed(*keys: int) -> int:
    """A 63-bit seed determined by a tuple of integers (e.g. seed, epoch, index), well mixed.

    Mixing through numpy's SeedSequence keeps nearby tuples like (0, 1, 2) and (0, 2, 1) unrelated.
    """
    words = np.random.SeedSequence([int(key) % 2**64 for key in keys]).generate_state(2, dtype=np.uint32)
    return ((int(words[0]) << 32) | int(words[1])) & (2**63 - 1)


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded with `derive_seed(*keys)`."""
    generator = torch.Generator()
    generator.manual_seed(derive_seed(*keys))
    return generator


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(low: int, high_inclusive: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(low, high_inclusive + 1, (), generator=generator))


class Compose:
    """Apply transforms in order, handing each the same generator.

    Plain callables taking only (image, target) are accepted too; they just get no generator.
    """

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)
        self._takes_generator = [_accepts_generator(transform) for transform in self.transforms]

    def __call__(self, image: torch.Tensor, target: dict, generator: torch.Generator | None = None):
        for transform, takes_generator in zip(self.transforms, self._takes_generator):
            if takes_generator:
                image, target = transform(image, target, generator=generator)
            else:
                image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def _accepts_generator(transform: Callable) -> bool:
    try:
        parameters = inspect.signature(transform).parameters
    except (TypeError, ValueError):
        return False
    return "generator" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def keypoint_flip_order(names: Sequence[str]) -> list[int]:
    """Where each keypoint comes from after a horizontal flip: "left_X" and "right_X" swap places, the others
    stay. Raises ValueError for a "left_X" without a "right_X" (or the reverse), which no flip could label."""
    position = {name: index for index, name in enumerate(names)}
    order = []
    for name in names:
        partner = name
        for side, other in (("left_", "right_"), ("right_", "left_")):
            if name.startswith(side):
                partner = other + name[len(side):]
                if partner not in position:
                    raise ValueError(f"keypoint {name!r} has no {partner!r} to swap with when the image is flipped")
        order.append(position[partner])
    return order


def _hide_unlabelled(keypoints: torch.Tensor) -> torch.Tensor:
    """COCO's convention, kept by every transform: a keypoint with v = 0 is (0, 0, 0)."""
    return keypoints * (keypoints[..., 2:] != 0)


class RandomHorizontalFlip:
    """Mirror image, boxes, masks and keypoints left-right with probability p.

    Keypoints: x becomes width - x, the convention of boxes here and of torchvision's detection references
    (references/detection/transforms.py, _flip_coco_person_keypoints: `width - x`, then v = 0 keypoints
    zeroed; torchvision.transforms.v2's kernel uses `width - 1 - x` instead, for pixel indices). A flipped
    person's left wrist is where a right wrist would be, so the "left_"/"right_" keypoints of
    `keypoint_names` swap places (keypoint_flip_order); a target with keypoints needs the names.
    """

    def __init__(self, p: float = 0.5, keypoint_names: Sequence[str] | None = None):
        self.p = p
        self.keypoint_order = keypoint_flip_order(keypoint_names) if keypoint_names else None

    def __call__(self, image: torch.Tensor, target: dict, generator: torch.Generator | None = None):
        if torch.rand((), generator=generator).item() >= self.p:
            return image, target
        width = image.shape[-1]
        target = dict(target)
        if "boxes" in target:
            boxes = target["boxes"]
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        if "keypoints" in target:
            if self.keypoint_order is None or len(self.keypoint_order) != target["keypoints"].shape[1]:
                raise ValueError("RandomHorizontalFlip needs the keypoint_names of the target's keypoints, to swap "
                                 "left and right")
            keypoints = target["keypoints"][:, self.keypoint_order].clone()
            keypoints[..., 0] = width - keypoints[..., 0]
            target["keypoints"] = _hide_unlabelled(keypoints)
        return image.flip(-1), target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ResizeShortestSide:
    """Multi-scale training: shorter side set to a random choice of `min_sizes`, longer side at most `max_size`.

    Instances whose mask vanishes when shrunk (or whose box falls under 1 px) are dropped.
    """

    def __init__(self, min_sizes: Sequence[int], max_size: int):
        if isinstance(min_sizes, int):
            min_sizes = (min_sizes,)
        if not min_sizes:
            raise ValueError("ResizeShortestSide needs at least one min size")
        self.min_sizes = tuple(int(size) for size in min_sizes)
        self.max_size = int(max_size)

    def __call__(self, image: torch.Tensor, target: dict, generator: torch.Generator | None = None):
        min_size = self.min_sizes[_randint(0, len(self.min_sizes) - 1, generator)]
        height, width = image.shape[-2:]
        scale = min_size / min(height, width)
        if max(height, width) * scale > self.max_size:
            scale = self.max_size / max(height, width)
        new_height = max(1, round(height * scale))
        new_width = max(1, round(width * scale))
        image, target = resize(image, target, new_height, new_width)
        return image, drop_vanished_instances(target)

    def __repr__(self) -> str:
        return f"ResizeShortestSide(min_sizes={self.min_sizes}, max_size={self.max_size})"


class LargeScaleJitter:
    """Large scale jitter (Ghiasi et al. 2021): random rescale, then crop or pad to a fixed square.

    The longer side becomes `output_size * s` with s uniform in `scale_range`; the result is randomly
    cropped to at most output_size on each side and zero-padded at the bottom/right to exactly
    output_size x output_size. Boxes of instances cut by the crop are recomputed from their masks
    (a clipped box would be too large for non-rectangular objects); instances that vanish are dropped.
    Keypoints are scaled with the image; those outside the crop become unlabelled (v = 0).
    """

    def __init__(self, output_size: int, scale_range: tuple[float, float] = (0.1, 2.0)):
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
        self.output_size = int(output_size)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))

    def __call__(self, image: torch.Tensor, target: dict, generator: torch.Generator | None = None):
        size = self.output_size
        height, width = image.shape[-2:]
        scale = _uniform(*self.scale_range, generator)
        factor = size * scale / max(height, width)
        new_height = max(1, round(height * factor))
        new_width = max(1, round(width * factor))
        image, target = resize(image, target, new_height, new_width)

        crop_height, crop_width = min(new_height, size), min(new_width, size)
        top = _randint(0, new_height - crop_height, generator)
        left = _randint(0, new_width - crop_width, generator)
        image, target = _crop(image, target, top, left, crop_height, crop_width)

        padded = image.new_zeros((image.shape[0], size, size))
        padded[:, :crop_height, :crop_width] = image
        if "masks" in target:
            masks = target["masks"]
            padded_masks = masks.new_zeros((masks.shape[0], size, size))
            padded_masks[:, :crop_height, :crop_width] = masks
            target["masks"] = padded_masks
        return padded, drop_vanished_instances(target)

    def __repr__(self) -> str:
        return f"LargeScaleJitter(output_size={self.output_size}, scale_range={self.scale_range})"


def resize(image: torch.Tensor, target: dict, new_height: int, new_width: int) -> tuple[torch.Tensor, dict]:
    """Resize image (bilinear, antialiased when shrinking), masks (nearest) and boxes together."""
    height, width = image.shape[-2:]
    image = F.interpolate(image[None], size=(new_height, new_width), mode="bilinear",
                          align_corners=False, antialias=True)[0]
    target = dict(target)
    if "boxes" in target:
        scale = torch.tensor([new_width / width, new_height / height] * 2, dtype=target["boxes"].dtype)
        target["boxes"] = target["boxes"] * scale
    if "masks" in target:
        # Nearest neighbour by pixel centres, so mask pixels stay aligned with the scaled boxes.
        rows = ((torch.arange(new_height) + 0.5) * (height / new_height)).long().clamp_(max=height - 1)
        cols = ((torch.arange(new_width) + 0.5) * (width / new_width)).long().clamp_(max=width - 1)
        target["masks"] = target["masks"][:, rows][:, :, cols]
    if "keypoints" in target:
        scale = torch.tensor([new_width / width, new_height / height, 1.0], dtype=target["keypoints"].dtype)
        target["keypoints"] = target["keypoints"] * scale
    return image, target


def _crop(image: torch.Tensor, target: dict, top: int, left: int, height: int, width: int):
    image = image[:, top:top + height, left:left + width]
    target = dict(target)
    if "masks" in target:
        target["masks"] = target["masks"][:, top:top + height, left:left + width]
    if "boxes" in target:
        boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=target["boxes"].dtype)
        cut = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > width) | (boxes[:, 3] > height)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        if "masks" in target and cut.any():
            boxes[cut] = masks_to_boxes(target["masks"][cut]).to(boxes.dtype)
        target["boxes"] = boxes
    if "keypoints" in target:
        # Keypoints outside the crop, [0, width] x [0, height] in the continuous coordinates of the boxes,
        # become unlabelled (v = 0, at 0, 0).
        keypoints = target["keypoints"] - torch.tensor([left, top, 0], dtype=target["keypoints"].dtype)
        x, y = keypoints[..., 0], keypoints[..., 1]
        inside = (x >= 0) & (x <= width) & (y >= 0) & (y <= height)
        target["keypoints"] = _hide_unlabelled(keypoints * inside[..., None])
    return image, target


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes in pixel-edge coordinates (a one-pixel mask at column 3 spans x 3..4).

    Empty masks give all-zero boxes.
    """
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    masks = masks != 0
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    height, width = rows.shape[1], cols.shape[1]
    y1 = rows.byte().argmax(dim=1)
    y2 = height - rows.flip(1).byte().argmax(dim=1)
    x1 = cols.byte().argmax(dim=1)
    x2 = width - cols.flip(1).byte().argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    boxes[~rows.any(dim=1)] = 0
    return boxes


def drop_vanished_instances(target: dict) -> dict:
    """Remove instances whose box is under 1 px or whose mask has no pixels left."""
    if "boxes" not in target:
        return target
    boxes = target["boxes"]
    keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    if "masks" in target:
        keep &= target["masks"].flatten(1).any(dim=1).bool()
    if bool(keep.all()):
        return target
    target = dict(target)
    for key in PER_INSTANCE_KEYS:
        if key in target:
            target[key] = target[key][keep]
    return target


class AspectRatioGroupedBatches:
    """Batches of indices whose images are all landscape (w >= h) or all portrait.

    Grouping keeps padding waste low when the model pads a batch to its largest image. The batches of
    an epoch are a pure function of (seed, epoch): indices are shuffled with a generator seeded from
    both, then dealt into a landscape and a portrait bucket, a batch being emitted whenever a bucket
    fills. What is left in the buckets at the end of the epoch (fewer than batch_size per group) is
    dropped; a new shuffle next epoch means every image still gets seen.

    Usable directly as a DataLoader `batch_sampler`: call `set_epoch(epoch)` before iterating.
    """

    def __init__(self, aspect_ratios: Sequence[float], batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.is_landscape = [ratio >= 1.0 for ratio in aspect_ratios]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0
        if len(self) == 0:
            raise ValueError(f"no full batch of {batch_size}: {sum(self.is_landscape)} landscape and "
                             f"{len(self.is_landscape) - sum(self.is_landscape)} portrait images")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(len(self.is_landscape), generator=seeded_generator(self.seed, epoch)).tolist()
        buckets: dict[bool, list[int]] = {True: [], False: []}
        batches = []
        for index in order:
            bucket = buckets[self.is_landscape[index]]
            bucket.append(index)
            if len(bucket) == self.batch_size:
                batches.append(list(bucket))
                bucket.clear()
        return batches

    def __len__(self) -> int:
        """Batches per epoch; exact, since each group yields floor(size / batch_size) whatever the order."""
        landscape = sum(self.is_landscape)
        portrait = len(self.is_landscape) - landscape
        return landscape // self.batch_size + portrait // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(self.epoch_batches(self.epoch))


__all__ = [
    "AspectRatioGroupedBatches", "Compose", "LargeScaleJitter", "RandomHorizontalFlip", "ResizeShortestSide",
    "derive_seed", "drop_vanished_instances", "keypoint_flip_order", "masks_to_boxes", "resize", "seeded_generator",
]
