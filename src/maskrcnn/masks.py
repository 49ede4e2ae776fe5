"""Instance masks kept small: each mask as the boolean crop of the image that holds all its pixels, plus
where that crop sits. A 6000x4000 photo with 100 detections needs 100 x 24 MB as full masks, but only the
objects' own areas as crops; the full (H, W) masks are made one at a time, and only where asked for."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["MaskCrops"]


def _tight(crop: np.ndarray, top: int, left: int) -> tuple[np.ndarray, int, int]:
    """`crop` cut down to the rows and columns that have a pixel set (an empty mask: a 0x0 crop at 0, 0)."""
    rows = np.flatnonzero(crop.any(axis=1))
    if len(rows) == 0:
        return np.zeros((0, 0), dtype=bool), 0, 0
    cols = np.flatnonzero(crop.any(axis=0))
    crop = crop[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    return crop.copy(), top + int(rows[0]), left + int(cols[0])  # a copy: never a view of the caller's array


class MaskCrops:
    """N boolean masks of an (H, W) image, held as crops: `crops[i]` (h_i, w_i) bool is the part of mask i
    from row `offsets[i, 0]` and column `offsets[i, 1]` on; every pixel outside it is False. Crops are
    always the tight bounding box of their mask's pixels (0x0 at (0, 0) for an empty mask), so two
    MaskCrops of the same masks hold the same arrays whichever way they were made."""

    def __init__(self, crops: Sequence[np.ndarray], offsets, image_size: tuple[int, int]):
        height, width = (int(s) for s in image_size)
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        if len(crops) != len(offsets):
            raise ValueError(f"{len(crops)} mask crops but {len(offsets)} offsets")
        self.image_size = (height, width)
        self.crops: list[np.ndarray] = []
        self.offsets = np.zeros((len(crops), 2), dtype=np.int64)
        for i, (crop, (top, left)) in enumerate(zip(crops, offsets.tolist())):
            crop = np.asarray(crop)
            if crop.ndim != 2:
                raise ValueError(f"mask crop {i} must be 2-D, got shape {crop.shape}")
            if crop.size and (top < 0 or left < 0 or top + crop.shape[0] > height or left + crop.shape[1] > width):
                raise ValueError(f"mask crop {i} ({crop.shape[0]}x{crop.shape[1]} at row {top}, column {left}) "
                                 f"reaches outside the {width}x{height} image")
            crop, top, left = _tight(crop.astype(bool, copy=False), top, left)
            self.crops.append(crop)
            self.offsets[i] = (top, left)

    @classmethod
    def from_full(cls, masks) -> MaskCrops:
        """From (N, H, W) masks (anything numpy reads as bool), one mask at a time."""
        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise ValueError(f"masks must have shape (N, H, W), got {masks.shape}")
        return cls([m.astype(bool, copy=False) for m in masks], np.zeros((len(masks), 2)), masks.shape[1:])

    @classmethod
    def from_probabilities(cls, crops: Sequence[np.ndarray], offsets, image_size: tuple[int, int],
                           threshold: float) -> MaskCrops:
        """From crops of mask probabilities, 0 everywhere outside them (as `paste_masks_in_crops` gives):
        a pixel is in the mask when its probability is at least `threshold`. A threshold <= 0 takes in the
        pixels outside the crops too (their 0 passes it), as thresholding the whole pasted canvas would."""
        if threshold > 0:
            return cls([np.asarray(c) >= threshold for c in crops], offsets, image_size)
        full = []
        for crop, (top, left) in zip(crops, np.asarray(offsets, dtype=np.int64).reshape(-1, 2).tolist()):
            mask = np.ones(image_size, dtype=bool)
            crop = np.asarray(crop)
            mask[top:top + crop.shape[0], left:left + crop.shape[1]] = crop >= threshold
            full.append(mask)
        return cls(full, np.zeros((len(full), 2)), image_size)

    @classmethod
    def coerce(cls, masks) -> MaskCrops:
        """MaskCrops as they are; anything else as (N, H, W) full masks."""
        return masks if isinstance(masks, MaskCrops) else cls.from_full(masks)

    def __len__(self) -> int:
        return len(self.crops)

    def __repr__(self) -> str:
        height, width = self.image_size
        return f"MaskCrops({len(self)} masks of a {width}x{height} image, {self.crop_area()} crop pixels)"

    def __getitem__(self, index) -> MaskCrops:
        """A subset by slice, integer array or boolean array, as MaskCrops again."""
        picked = np.arange(len(self))[index]
        return MaskCrops([self.crops[i] for i in np.atleast_1d(picked).tolist()], self.offsets[picked].reshape(-1, 2),
                         self.image_size)

    def crop_area(self) -> int:
        """Pixels held, all crops together."""
        return int(sum(c.size for c in self.crops))

    def window(self, i: int) -> tuple[slice, slice]:
        """The rows and columns of the image that crop i covers."""
        (top, left), (h, w) = self.offsets[i].tolist(), self.crops[i].shape
        return slice(top, top + h), slice(left, left + w)

    def mask(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Mask i at image size, (H, W) bool (written into `out` when given, which must be all False)."""
        if out is None:
            out = np.zeros(self.image_size, dtype=bool)
        out[self.window(i)] = self.crops[i]
        return out

    def full(self) -> np.ndarray:
        """All masks at image size, (N, H, W) bool: N x H x W bytes, so only for small images or few masks."""
        out = np.zeros((len(self), *self.image_size), dtype=bool)
        for i in range(len(self)):
            self.mask(i, out[i])
        return out

    def to_rle(self) -> list[dict]:
        """COCO run-length encoding of each mask, `counts` as str (JSON-ready), through one image-sized
        buffer: the same RLEs as encoding the full masks, for H x W bytes."""
        buffer = np.zeros((*self.image_size, 1), dtype=np.uint8, order="F")
        rles = []
        for i in range(len(self)):
            window = self.window(i)
            buffer[window + (0,)] = self.crops[i]
            rle = mask_utils.encode(buffer)[0]
            buffer[window + (0,)] = 0
            rle["counts"] = rle["counts"].decode("ascii")
            rles.append(rle)
        return rles

    def paint(self, order) -> np.ndarray:
        """(H, W) int32: the index of the last mask in `order` that covers each pixel, -1 where none does."""
        owner = np.full(self.image_size, -1, dtype=np.int32)
        for i in np.asarray(order, dtype=np.int64).tolist():
            owner[self.window(i)][self.crops[i]] = i
        return owner
