"""Augmentations keep image, boxes and masks aligned, and draw all randomness from the given generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskrcnn.data.augment import (
    AspectRatioGroupedBatches,
    Compose,
    LargeScaleJitter,
    RandomHorizontalFlip,
    ResizeShortestSide,
    masks_to_boxes,
)

HEIGHT, WIDTH = 40, 80
# Rectangles (x1, y1, x2, y2) in pixel-edge coordinates: the box of a rectangle mask is exactly this.
RECTANGLES = [(10, 5, 30, 20), (0, 0, 8, 8), (72, 32, 80, 40), (20, 10, 70, 35)]


def _sample(generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    image = torch.rand(3, HEIGHT, WIDTH, generator=g)
    masks = torch.zeros(len(RECTANGLES), HEIGHT, WIDTH, dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(RECTANGLES):
        masks[k, y1:y2, x1:x2] = 1
    # Make the last one a triangle-ish staircase so its box differs from a clipped box after cropping.
    masks[3] = 0
    for row in range(10, 35):
        masks[3, row, 20:20 + 2 * (row - 9)] = 1
    target = {
        "boxes": torch.tensor(RECTANGLES, dtype=torch.float32),
        "labels": torch.tensor([1, 2, 3, 4]),
        "masks": masks,
        "image_id": 7,
    }
    return image, target


def _tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_masks_to_boxes_hand_case():
    masks = torch.zeros(3, 5, 6, dtype=torch.uint8)
    masks[0, 1, 2] = 1
    masks[1, 0:5, 4:6] = 1
    boxes = masks_to_boxes(masks)
    assert boxes.tolist() == [[2, 1, 3, 2], [4, 0, 6, 5], [0, 0, 0, 0]]


def test_flip_hand_case_and_twice_is_identity():
    image, target = _sample()
    flip = RandomHorizontalFlip(p=1.0)
    flipped_image, flipped = flip(image, target)
    assert flipped["boxes"][0].tolist() == [WIDTH - 30, 5, WIDTH - 10, 20]
    assert torch.equal(flipped_image[:, :, 0], image[:, :, -1])
    assert flipped["masks"][1, 0, WIDTH - 1] == 1 and flipped["masks"][1, 0, 0] == 0
    again_image, again = flip(flipped_image, flipped)
    assert torch.equal(again_image, image)
    assert torch.equal(again["boxes"], target["boxes"])
    assert torch.equal(again["masks"], target["masks"])
    assert again["image_id"] == 7


def test_flip_with_p_zero_changes_nothing():
    image, target = _sample()
    out_image, out = RandomHorizontalFlip(p=0.0)(image, target)
    assert torch.equal(out_image, image) and torch.equal(out["boxes"], target["boxes"])


def test_transforms_do_not_modify_their_input():
    image, target = _sample()
    boxes_before, masks_before = target["boxes"].clone(), target["masks"].clone()
    for transform in [RandomHorizontalFlip(1.0), ResizeShortestSide((20,), 100), LargeScaleJitter(50, (1.5, 1.5))]:
        transform(image, target, generator=torch.Generator().manual_seed(0))
    assert torch.equal(target["boxes"], boxes_before) and torch.equal(target["masks"], masks_before)


def test_resize_shortest_side_hand_cases():
    image, target = _sample()
    out_image, out = ResizeShortestSide((80,), 1000)(image, target)
    assert out_image.shape == (3, 80, 160)
    assert torch.equal(out["boxes"], target["boxes"] * 2)
    # Doubling with nearest neighbour repeats every pixel twice in each direction.
    expected_masks = target["masks"].repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    assert torch.equal(out["masks"], expected_masks)

    capped_image, capped = ResizeShortestSide((500,), 120)(image, target)
    assert capped_image.shape == (3, 60, 120)  # long side 80 -> 120 caps the scale at 1.5
    assert torch.allclose(capped["boxes"], target["boxes"] * 1.5)


def test_resize_choice_comes_from_generator():
    image, target = _sample()
    resize = ResizeShortestSide((20, 30, 40, 50, 60), 1000)
    sizes = {resize(image, target, generator=torch.Generator().manual_seed(seed))[0].shape[1] for seed in range(40)}
    assert sizes == {20, 30, 40, 50, 60}
    first = resize(image, target, generator=torch.Generator().manual_seed(3))[0].shape
    assert all(resize(image, target, generator=torch.Generator().manual_seed(3))[0].shape == first for _ in range(5))


def test_resize_drops_instances_that_vanish():
    image, target = _sample()
    target["masks"][1] = 0
    target["masks"][1, 0, 0] = 1
    target["boxes"][1] = torch.tensor([0, 0, 1, 1])
    _, out = ResizeShortestSide((10,), 1000)(image, target)  # scale 0.25: a 1 px box becomes 0.25 px
    assert out["labels"].tolist() == [1, 3, 4]
    assert len(out["boxes"]) == len(out["masks"]) == 3


def test_large_scale_jitter_downscale_pads_with_zeros():
    image, target = _sample()
    out_image, out = LargeScaleJitter(100, (0.5, 0.5))(image, target)
    # Longer side 80 -> 50: factor 0.625, so 40x80 becomes 25x50, placed top-left in a 100x100 canvas.
    assert out_image.shape == (3, 100, 100)
    assert (out_image[:, 25:, :] == 0).all() and (out_image[:, :, 50:] == 0).all()
    assert (out_image[:, :25, :50] != 0).any()
    assert torch.allclose(out["boxes"], target["boxes"] * 0.625)
    assert out["masks"].shape == (4, 100, 100)


def test_large_scale_jitter_crop_recomputes_cut_boxes_from_masks():
    image, target = _sample()
    for seed in range(12):
        out_image, out = LargeScaleJitter(80, (2.0, 2.0))(image, target, generator=torch.Generator().manual_seed(seed))
        # 40x80 doubled is 80x160: the crop keeps every row and a random window of 80 columns.
        full = F.interpolate(image[None], size=(80, 160), mode="bilinear", align_corners=False, antialias=True)[0]
        lefts = [left for left in range(81) if torch.allclose(full[:, :, left:left + 80], out_image)]
        assert len(lefts) == 1
        left = lefts[0]
        doubled = target["masks"].repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)[:, :, left:left + 80]
        survivors = [k for k in range(4) if doubled[k].any()]
        assert out["labels"].tolist() == [k + 1 for k in survivors]
        for row, k in enumerate(survivors):
            assert torch.equal(out["masks"][row], doubled[k])
            expected = _tight_box(doubled[k].numpy())
            scaled = (target["boxes"][k] * 2 - torch.tensor([left, 0, left, 0])).tolist()
            if scaled[0] >= 0 and scaled[2] <= 80:
                expected = scaled  # not cut: the scaled json box is kept as is
            assert out["boxes"][row].tolist() == pytest.approx(expected)


def test_large_scale_jitter_output_is_always_exact_and_consistent():
    image, target = _sample()
    jitter = LargeScaleJitter(64)
    for seed in range(20):
        out_image, out = jitter(image, target, generator=torch.Generator().manual_seed(seed))
        assert out_image.shape == (3, 64, 64)
        assert out["masks"].shape[1:] == (64, 64)
        assert len(out["boxes"]) == len(out["labels"]) == len(out["masks"])
        assert (out["boxes"] >= 0).all() and (out["boxes"] <= 64).all()
        for box, mask, label in zip(out["boxes"], out["masks"], out["labels"]):
            assert mask.any()
            # Scaled rectangles stay within one pixel of their nearest-neighbour mask; the staircase's
            # one-row tip can be skipped by nearest sampling, costing up to its 2 px step (at scale <= 2).
            tolerance = 1.0 if label < 4 else 3.0
            assert (box - torch.tensor(_tight_box(mask.numpy()), dtype=torch.float32)).abs().max() <= tolerance


def test_same_generator_seed_gives_same_output_and_global_rng_is_the_fallback():
    image, target = _sample()
    pipeline = Compose([RandomHorizontalFlip(), ResizeShortestSide((30, 40, 50), 200), LargeScaleJitter(48)])
    a_image, a = pipeline(image, target, generator=torch.Generator().manual_seed(11))
    b_image, b = pipeline(image, target, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a_image, b_image) and torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])
    outputs = {pipeline(image, target, generator=torch.Generator().manual_seed(seed))[0].sum().item()
               for seed in range(6)}
    assert len(outputs) > 1

    torch.manual_seed(123)
    c_image, _ = pipeline(image, target)
    torch.manual_seed(123)
    d_image, _ = pipeline(image, target)
    assert torch.equal(c_image, d_image)


def test_compose_hands_the_generator_down_and_accepts_plain_callables():
    image, target = _sample()
    jitter = LargeScaleJitter(48)
    seen = []

    def record(image, target):
        seen.append(image.shape)
        return image, target

    composed_image, composed = Compose([jitter, record])(image, target, generator=torch.Generator().manual_seed(4))
    direct_image, direct = jitter(image, target, generator=torch.Generator().manual_seed(4))
    assert torch.equal(composed_image, direct_image) and torch.equal(composed["boxes"], direct["boxes"])
    assert seen == [(3, 48, 48)]


def test_empty_target_passes_through_every_transform():
    image = torch.rand(3, 30, 50)
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 30, 50, dtype=torch.uint8)}
    pipeline = Compose([RandomHorizontalFlip(1.0), ResizeShortestSide((60,), 500), LargeScaleJitter(40)])
    out_image, out = pipeline(image, target, generator=torch.Generator().manual_seed(0))
    assert out_image.shape == (3, 40, 40)
    assert out["boxes"].shape == (0, 4) and out["masks"].shape == (0, 40, 40)


# ---- aspect-ratio grouped batches ------------------------------------------------------------------------

RATIOS = [1.5, 0.7, 1.0, 0.5, 2.0, 0.8, 1.33, 0.75, 1.2, 0.6, 1.1, 0.9, 1.0, 0.4, 3.0]
LANDSCAPE = {i for i, r in enumerate(RATIOS) if r >= 1}  # 8 landscape (w >= h), 7 portrait


def test_batches_are_grouped_full_and_without_repeats():
    sampler = AspectRatioGroupedBatches(RATIOS, batch_size=3, seed=0)
    assert len(sampler) == 8 // 3 + 7 // 3 == 4
    for epoch in range(5):
        batches = sampler.epoch_batches(epoch)
        assert len(batches) == 4
        flat = [i for batch in batches for i in batch]
        assert len(flat) == len(set(flat))
        for batch in batches:
            assert len(batch) == 3
            assert len({i in LANDSCAPE for i in batch}) == 1
        # Only the leftovers (fewer than a batch per group) are missing.
        assert len(LANDSCAPE - set(flat)) == 8 % 3 and len(set(range(15)) - LANDSCAPE - set(flat)) == 7 % 3


def test_batches_are_a_function_of_seed_and_epoch():
    first = AspectRatioGroupedBatches(RATIOS, 2, seed=1)
    second = AspectRatioGroupedBatches(RATIOS, 2, seed=1)
    assert first.epoch_batches(3) == second.epoch_batches(3)
    assert first.epoch_batches(3) != first.epoch_batches(4)
    assert first.epoch_batches(3) != AspectRatioGroupedBatches(RATIOS, 2, seed=2).epoch_batches(3)
    second.set_epoch(3)
    assert list(second) == first.epoch_batches(3)


def test_every_image_is_seen_across_epochs():
    sampler = AspectRatioGroupedBatches(RATIOS, 4, seed=0)
    seen = {i for epoch in range(30) for batch in sampler.epoch_batches(epoch) for i in batch}
    assert seen == set(range(len(RATIOS)))


def test_too_few_images_for_one_batch():
    with pytest.raises(ValueError, match="no full batch"):
        AspectRatioGroupedBatches([1.0, 0.5], batch_size=2, seed=0)
