"""Training-mode losses equal torchvision's on the same weights, images and targets."""

from __future__ import annotations

import pytest
import torch

import maskrcnn
from conftest import torchvision_reference
from maskrcnn.modeling.matching import BACKGROUND, IGNORED, match_boxes, sample_balanced

EVERYTHING = 10 ** 9  # a sample size larger than any candidate set: sampling keeps all, so no randomness


def make_targets(seed: int, sizes: list[tuple[int, int]], num_classes: int):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for n, (h, w) in zip((3, 0, 5), sizes):
        images.append(torch.rand(3, h, w, generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 8 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4])
        boxes = torch.cat((xy, xy + wh), 1).round()
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for m, b in zip(masks, boxes.long()):
            m[b[1]:b[3], b[0]:(b[0] + b[2]) // 2 + 1] = 1  # left half of the box: masks differ from boxes
        labels = torch.randint(1, num_classes, (n,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, targets


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_losses_match_torchvision(version, tmp_path):
    reference = torchvision_reference(version, num_classes=6)
    torch.save(reference.state_dict(), tmp_path / "ref.pth")
    ours = maskrcnn.load(tmp_path / "ref.pth")
    for model in (reference, ours):
        model.transform.min_size, model.transform.max_size = (224,), 320
    reference.rpn.fg_bg_sampler.batch_size_per_image = EVERYTHING
    reference.roi_heads.fg_bg_sampler.batch_size_per_image = EVERYTHING
    ours.config.rpn.batch_size_per_image = EVERYTHING
    ours.config.box_batch_size_per_image = EVERYTHING
    reference.train()
    ours.train()
    images, targets = make_targets(0, [(200, 260), (180, 240), (240, 200)], 6)
    expected = reference(images, [dict(t) for t in targets])
    actual = ours(images, [dict(t) for t in targets])
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert value.item() > 0, name
        assert torch.allclose(actual[name], value, rtol=1e-4, atol=1e-6), (name, actual[name].item(), value.item())
    # and gradients flow to every head
    sum(actual.values()).backward()
    for name in ("rpn.head.objectness.weight", "box_predictor.class_logits.weight", "mask_predictor.logits.weight",
                 "fpn.output.0.conv.weight", "backbone.layer4.0.conv1.weight"):
        assert ours.get_parameter(name).grad.abs().sum() > 0, name


def test_matching_by_hand():
    gt = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    boxes = torch.tensor([[0.0, 0, 10, 10],     # IoU 1 with gt 0
                          [0, 0, 10, 20],       # IoU 0.5 with gt 0
                          [20, 20, 29, 30],     # IoU 0.9 with gt 1
                          [50, 50, 60, 60],     # nothing
                          [0, 0, 10, 30]])      # IoU 1/3 with gt 0
    assert match_boxes(gt, boxes, 0.7, 0.3, False).tolist() == [0, IGNORED, 1, BACKGROUND, IGNORED]
    # gt 1's best box (IoU .9) is already positive; make a gt whose best box is only ambiguous
    gt2 = torch.tensor([[0.0, 0, 10, 60]])  # IoUs with the three boxes: 1/3, 0, 1/2
    assert match_boxes(gt2, boxes[[1, 3, 4]], 0.7, 0.3, False).tolist() == [IGNORED, BACKGROUND, IGNORED]
    assert match_boxes(gt2, boxes[[1, 3, 4]], 0.7, 0.3, True).tolist() == [IGNORED, BACKGROUND, 0]
    assert match_boxes(gt[:0], boxes, 0.7, 0.3, True).tolist() == [BACKGROUND] * 5


def test_balanced_sampling_caps():
    labels = torch.tensor([1] * 10 + [0] * 100 + [-1] * 5)
    pos, neg = sample_balanced(labels, 32, 0.25, torch.Generator().manual_seed(0))
    assert len(pos) == 8 and len(neg) == 24
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all() and len(set(pos.tolist())) == 8
    pos, neg = sample_balanced(labels, 512, 0.25)
    assert len(pos) == 10 and len(neg) == 100  # fewer candidates than asked: take them all


def test_mask_rois_per_image_spreads_the_cap_over_objects():
    from maskrcnn.modeling.losses import _mask_rois

    labels = torch.tensor([3, 3, 3, 2, 3, 2, 0, 0, 1])  # positives first, as the sampler returns them
    objects = torch.tensor([0, 0, 0, 1, 0, 1, 0, 0, 2])  # matched ground-truth index of each proposal
    assert _mask_rois(labels, objects, None).tolist() == (labels > 0).tolist()
    assert _mask_rois(labels, objects, 10).tolist() == (labels > 0).tolist()
    # round 1: the first positive of objects 0, 1 and 2 (positions 0, 3, 8); round 2: the second of 0 and 1
    assert torch.where(_mask_rois(labels, objects, 3))[0].tolist() == [0, 3, 8]
    assert torch.where(_mask_rois(labels, objects, 4))[0].tolist() == [0, 1, 3, 8]
    assert torch.where(_mask_rois(labels, objects, 5))[0].tolist() == [0, 1, 3, 5, 8]
    assert not _mask_rois(torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), 2).any()


def test_capped_mask_rois_change_only_the_mask_loss():
    images, targets = make_targets(3, [(96, 128), (80, 80), (128, 96)], num_classes=5)
    options = dict(fpn_channels=32, mask_head_channels=16, box_head_hidden=32, min_size=96, max_size=128)
    torch.manual_seed(0)
    every = maskrcnn.build_model("resnet18_fpn", num_classes=5, **options).train()
    capped = maskrcnn.build_model("resnet18_fpn", num_classes=5, mask_rois_per_image=1, **options).train()
    capped.load_state_dict(every.state_dict())
    losses = [model(images, targets, generators=[torch.Generator().manual_seed(i) for i in range(3)])
              for model in (every, capped)]
    for name in ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"):
        assert torch.allclose(losses[0][name], losses[1][name]), name
    assert not torch.allclose(losses[0]["loss_mask"], losses[1]["loss_mask"])


def test_jittered_boxes_scatter_around_their_box():
    """Centres move and sides scale by ~N(0, GT_JITTER_STD) of the box size, reproducibly from the
    generator; most copies still overlap their box at IoU >= 0.5 (they become positives)."""
    from torchvision.ops import box_iou

    from maskrcnn.modeling.losses import GT_JITTER_STD, jittered_boxes

    box = torch.tensor([[40.0, 30.0, 100.0, 70.0]])  # 60 x 40
    first = jittered_boxes(box, 4000, torch.Generator().manual_seed(3))
    again = jittered_boxes(box, 4000, torch.Generator().manual_seed(3))
    assert first.shape == (4000, 4) and torch.equal(first, again)
    centre = (first[:, :2] + first[:, 2:]) / 2
    size = first[:, 2:] - first[:, :2]
    offset_std = ((centre - torch.tensor([70.0, 50.0])) / torch.tensor([60.0, 40.0])).std(0)
    log_scale_std = torch.log(size / torch.tensor([60.0, 40.0])).std(0)
    assert torch.allclose(offset_std, torch.full((2,), GT_JITTER_STD), rtol=0.08)
    assert torch.allclose(log_scale_std, torch.full((2,), GT_JITTER_STD), rtol=0.08)
    assert (box_iou(first, box)[:, 0] >= 0.5).float().mean() > 0.8


def test_gt_jitter_copies_add_positives_to_the_box_head_samples():
    from maskrcnn.modeling.losses import sample_proposals
    from maskrcnn.modeling.model import ModelConfig

    target = {"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0], [60.0, 20.0, 90.0, 80.0]]),
              "labels": torch.tensor([1, 2])}
    background = torch.tensor([[150.0, 150.0, 190.0, 190.0]]).repeat(50, 1)
    plain = sample_proposals(background, target, ModelConfig(), torch.Generator().manual_seed(0))
    assert int((plain["labels"] > 0).sum()) == 2  # the ground-truth boxes only
    jittered = sample_proposals(background, target, ModelConfig(gt_jitter_copies=10),
                                torch.Generator().manual_seed(0))
    positive = jittered["labels"] > 0
    assert int(positive.sum()) > 12
    # each positive keeps the label of the object it was jittered from
    assert torch.equal(jittered["labels"][positive], target["labels"][jittered["gt_index"][positive]])
    with pytest.raises(ValueError, match="gt_jitter_copies"):
        from maskrcnn.modeling.model import MaskRCNN
        MaskRCNN(ModelConfig(depth=18, gt_jitter_copies=-1))
