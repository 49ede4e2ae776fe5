"""The keypoint loss equals torchvision's keypointrcnn_loss on the same heatmaps, proposals and keypoints,
and a keypoint model trains (its loss reaches the keypoint head)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from maskrcnn.modeling.keypoints import heatmap_targets
from maskrcnn.modeling.losses import keypoint_loss


def random_case(seed: int, counts=(6, 0, 4), num_gt=(3, 0, 2), k=5, size=56):
    g = torch.Generator().manual_seed(seed)
    heatmaps = torch.randn(sum(counts), k, size, size, generator=g)
    samples, targets = [], []
    for n, m in zip(counts, num_gt):
        xy = torch.rand(n, 2, generator=g) * 100
        boxes = torch.cat((xy, xy + 10 + torch.rand(n, 2, generator=g) * 60), 1)
        gt_index = torch.randint(0, max(m, 1), (n,), generator=g)
        points = torch.rand(m, k, 3, generator=g) * 180 - 10  # some outside their proposals
        points[..., 2] = (torch.rand(m, k, generator=g) > 0.3).float() * 2  # visibility 0 or 2
        if n and m:  # keypoints exactly on a proposal's right / bottom edge go to the last cell
            cx, cy = (boxes[0, 0] + boxes[0, 2]) / 2, (boxes[0, 1] + boxes[0, 3]) / 2
            points[gt_index[0], 0] = torch.stack((boxes[0, 2], cy, torch.tensor(2.0)))
            points[gt_index[0], 1] = torch.stack((cx, boxes[0, 3], torch.tensor(2.0)))
        samples.append({"boxes": boxes, "gt_index": gt_index})
        targets.append({"keypoints": points})
    return heatmaps, samples, targets


def test_keypoint_loss_matches_torchvision():
    from torchvision.models.detection.roi_heads import keypointrcnn_loss

    heatmaps, samples, targets = random_case(0)
    positive = [torch.ones(len(s["boxes"]), dtype=torch.bool) for s in samples]
    total, count = keypoint_loss(heatmaps, samples, positive, targets)
    expected = keypointrcnn_loss(heatmaps, [s["boxes"] for s in samples], [t["keypoints"] for t in targets],
                                 [s["gt_index"] for s in samples])
    assert 0 < count < heatmaps.shape[0] * heatmaps.shape[1], "some keypoints should count and some not"
    assert torch.allclose(total / count, expected, rtol=1e-6), (total / count, expected)


def test_heatmap_targets_match_torchvision_and_edges():
    from torchvision.models.detection.roi_heads import keypoints_to_heatmap

    _, samples, targets = random_case(1)
    boxes, points = samples[0]["boxes"], targets[0]["keypoints"][samples[0]["gt_index"]]
    cells, valid = heatmap_targets(points, boxes, 56)
    expected_cells, expected_valid = keypoints_to_heatmap(points, boxes, 56)
    assert torch.equal(cells, expected_cells) and torch.equal(valid, expected_valid.bool())
    assert cells[0, 0] % 56 == 55 and cells[0, 1] // 56 == 55  # the edge keypoints: last column, last row


def test_no_visible_keypoints_gives_zero_loss():
    heatmaps, samples, targets = random_case(2)
    for t in targets:
        t["keypoints"][..., 2] = 0
    positive = [torch.ones(len(s["boxes"]), dtype=torch.bool) for s in samples]
    total, count = keypoint_loss(heatmaps.requires_grad_(), samples, positive, targets)
    assert count == 0 and total.item() == 0
    total.backward()  # still part of the graph


def test_keypoint_model_trains():
    model = tiny_model(masks=False, keypoints=3, keypoint_head_channels=32).train()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 120, 160, generator=g), torch.rand(3, 100, 100, generator=g)]
    boxes = [torch.tensor([[10.0, 20, 90, 110], [50, 5, 150, 60]]), torch.zeros((0, 4))]
    keypoints = [torch.tensor([[[30.0, 40, 2], [60, 80, 1], [0, 0, 0]], [[60, 10, 2], [100, 30, 2], [140, 50, 2]]]),
                 torch.zeros((0, 3, 3))]
    targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64), "keypoints": k}
               for b, k in zip(boxes, keypoints)]
    losses = model(images, targets, [torch.Generator().manual_seed(i) for i in range(2)])
    assert "loss_mask" not in losses and losses["loss_keypoint"].item() > 0
    sum(losses.values()).backward()
    for name in ("keypoint_predictor.upsample.weight", "keypoint_head.convs.0.conv.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_targets_without_keypoints_are_refused():
    model = tiny_model(keypoints=3, keypoint_head_channels=32).train()
    target = {"boxes": torch.tensor([[10.0, 20, 90, 110]]), "labels": torch.tensor([1]),
              "masks": torch.zeros((1, 120, 160), dtype=torch.uint8)}
    with pytest.raises(ValueError, match=r"target 0: a model with 3 keypoints needs keypoints of shape \(1, 3, 3\)"):
        model([torch.rand(3, 120, 160)], [target])
