"""The training-mode forward pass: the same stages as inference, plus the five Mask R-CNN losses.

    loss_objectness   RPN: is there an object at this anchor (binary cross-entropy)
    loss_rpn_box_reg  RPN: anchor -> object box deltas (smooth L1), positives only
    loss_classifier   box head: which class is this proposal (cross-entropy)
    loss_box_reg      box head: proposal -> object box deltas for its true class (smooth L1)
    loss_mask         mask head: 28x28 mask of the true class (per-pixel binary cross-entropy)
    loss_keypoint     keypoint head (ModelConfig.keypoints > 0): which of the 56x56 heatmap cells holds each
                      visible keypoint (cross-entropy over the cells)
Models without a mask branch (ModelConfig.masks False) have no loss_mask.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.ops import roi_align

from .fpn import pooled_levels
from .keypoints import heatmap_targets
from .matching import BACKGROUND, IGNORED, match_boxes, sample_balanced
from .plan import training_plan
from .rpn import RPNOutputs

SMOOTH_L1_BETA = 1.0 / 9


def training_losses(model, images: list[torch.Tensor], targets: list[dict],
                    generators: list[torch.Generator] | None = None) -> dict[str, torch.Tensor]:
    """Losses for a batch. `generators` (one per image) drive the random sampling of anchors and proposals;
    seeding them from the image's place in the global batch makes a run reproducible and lets N processes
    with B images each compute exactly what one process with N*B images would (see `_normalise`)."""
    _check_targets(images, targets, model.config)
    generators = generators or [None] * len(images)
    batch, sizes, targets = model.transform(images, targets)
    plan = training_plan(batch.device.type)
    if plan.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    features = model.features(batch, plan)
    proposals, rpn_out = model.rpn(features, sizes, batch.shape[-2:])
    sums = rpn_losses(model.rpn, rpn_out, targets, generators)

    cfg = model.config
    samples = [sample_proposals(p.detach(), t, cfg, g) for p, t, g in zip(proposals, targets, generators)]
    boxes = [s["boxes"] for s in samples]
    pooled_from = pooled_levels(features)
    pooled = model.box_pooler(pooled_from, boxes, sizes, plan.roi_align)
    class_logits, box_deltas = model.box_predictor(model.box_head(pooled, plan.norms))
    sums.update(box_losses(class_logits, box_deltas, samples, model.box_coder))

    positive = [_mask_rois(s["labels"], s["gt_index"], cfg.mask_rois_per_image) for s in samples]
    pos_boxes = [s["boxes"][p] for s, p in zip(samples, positive)]
    if cfg.masks:
        pos_labels = torch.cat([s["labels"][p] for s, p in zip(samples, positive)])
        # plan.mask_classes is "detected": the logits of each positive's true class only
        mask_features = model.mask_head(model.mask_pooler(pooled_from, pos_boxes, sizes, plan.roi_align), plan.norms)
        mask_logits = model.mask_predictor(mask_features, plan.mask_upsampling, labels=pos_labels)
        sums["loss_mask"] = mask_loss(mask_logits, samples, positive, targets)
    if cfg.keypoints:  # the same positives (all of them unless mask_rois_per_image caps them)
        pooled = model.keypoint_pooler(pooled_from, pos_boxes, sizes, plan.roi_align)
        heatmaps = model.keypoint_predictor(model.keypoint_head(pooled, plan.norms))
        sums["loss_keypoint"] = keypoint_loss(heatmaps, samples, positive, targets)
    return _normalise(sums)


def _mask_rois(labels: torch.Tensor, gt_index: torch.Tensor, limit: int | None) -> torch.Tensor:
    """Which sampled proposals train the mask head: the positives, at most `limit` of them, spread over the
    objects: the first positive of every object, then the second of every object, and so on (the sampler
    lists positives first in random order, which decides within each round). A large object has many more
    positive proposals than a small one, and the mask head's cost grows with every RoI; taken at random,
    the capped RoIs would be mostly near-copies of the largest objects."""
    positive = labels > 0
    if limit is None or int(positive.sum()) <= limit:
        return positive
    index = torch.where(positive)[0]
    objects = gt_index[index]
    # how many earlier positives share the object: 0 for its first positive, 1 for its second, ...
    rank = torch.tril(objects[:, None] == objects[None, :], diagonal=-1).sum(1)
    keep = index[torch.argsort(rank, stable=True)[:limit]]
    chosen = torch.zeros_like(positive)
    chosen[keep] = True
    return chosen


def _normalise(sums: dict[str, tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """Each loss is a sum over samples divided by the number of samples in the *global* batch.

    Under DistributedDataParallel gradients are averaged over the N processes, so each process divides by
    (global count / N): the result equals the single-process loss on the combined batch, whatever the
    number of positives each process happened to draw."""
    names = list(sums)
    counts = torch.tensor([float(sums[n][1]) for n in names])
    world = 1
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        device = sums[names[0]][0].device if dist.get_backend() == "nccl" else torch.device("cpu")
        counts = counts.to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    return {n: sums[n][0] / max(counts[i].item() / world, 1e-12) if counts[i] > 0 else sums[n][0] * 0
            for i, n in enumerate(names)}


def _check_targets(images: list[torch.Tensor], targets: list[dict], cfg) -> None:
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    for i, t in enumerate(targets):
        boxes = t["boxes"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target {i}: boxes must have shape (N, 4), got {tuple(boxes.shape)}")
        expected = (len(boxes), cfg.keypoints, 3)
        if cfg.keypoints and ("keypoints" not in t or tuple(t["keypoints"].shape) != expected):
            got = tuple(t["keypoints"].shape) if "keypoints" in t else "none"
            raise ValueError(f"target {i}: a model with {cfg.keypoints} keypoints needs keypoints of shape "
                             f"{expected}, got {got}")
        if len(boxes) and ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
            raise ValueError(f"target {i}: boxes must have positive width and height")


def rpn_losses(rpn, out: RPNOutputs, targets: list[dict],
               generators: list[torch.Generator | None]) -> dict[str, tuple[torch.Tensor, int]]:
    cfg = rpn.config
    labels, regression = [], []
    for t in targets:
        matches = match_boxes(t["boxes"], out.anchors, cfg.fg_iou_thresh, cfg.bg_iou_thresh,
                              keep_best_for_each_gt=True)
        label = (matches >= 0).to(torch.float32)
        label[matches == IGNORED] = -1.0
        labels.append(label)
        gt = t["boxes"][matches.clamp(min=0)] if len(t["boxes"]) else torch.zeros_like(out.anchors)
        regression.append(rpn.box_coder.encode(gt, out.anchors))
    pos, neg = [], []
    for i, (label, generator) in enumerate(zip(labels, generators)):
        p, n = sample_balanced(label, cfg.batch_size_per_image, cfg.positive_fraction, generator)
        offset = i * len(label)
        pos.append(p + offset)
        neg.append(n + offset)
    pos, neg = torch.cat(pos), torch.cat(neg)
    sampled = torch.cat((pos, neg))
    objectness = out.objectness.reshape(-1)
    deltas = out.deltas.reshape(-1, 4)
    labels, regression = torch.cat(labels), torch.cat(regression)
    box_loss = F.smooth_l1_loss(deltas[pos], regression[pos], beta=SMOOTH_L1_BETA, reduction="sum")
    objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled], reduction="sum")
    return {"loss_objectness": (objectness_loss, sampled.numel()),
            "loss_rpn_box_reg": (box_loss, sampled.numel())}


def sample_proposals(proposals: torch.Tensor, target: dict, cfg,
                     generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Proposals to train the box head on (ground truth added, so every object has a perfect proposal),
    with their class labels, regression targets' source boxes and matched ground-truth index."""
    gt_boxes, gt_labels = target["boxes"], target["labels"]
    boxes = torch.cat((proposals, gt_boxes.to(proposals.dtype)))
    if cfg.gt_jitter_copies and len(gt_boxes):
        boxes = torch.cat((boxes, jittered_boxes(gt_boxes.to(proposals.dtype), cfg.gt_jitter_copies, generator)))
    matches = match_boxes(gt_boxes, boxes, cfg.box_fg_iou_thresh, cfg.box_bg_iou_thresh,
                          keep_best_for_each_gt=False)
    if len(gt_boxes):
        labels = gt_labels[matches.clamp(min=0)].to(torch.int64)
        matched_gt = gt_boxes[matches.clamp(min=0)]
    else:
        labels = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
        matched_gt = torch.zeros_like(boxes)
    labels[matches == BACKGROUND] = 0
    labels[matches == IGNORED] = -1
    pos, neg = sample_balanced(labels, cfg.box_batch_size_per_image, cfg.box_positive_fraction, generator)
    keep = torch.cat((pos, neg))
    return {"boxes": boxes[keep], "labels": labels[keep], "matched_gt": matched_gt[keep],
            "gt_index": matches[keep].clamp(min=0)}


GT_JITTER_STD = 0.12  # of the box's width/height: most copies keep IoU >= 0.5 with their object


def jittered_boxes(boxes: torch.Tensor, copies: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`copies` random variants of each box: centre moved and sides scaled by ~N(0, 0.12) of its size.

    Trained from scratch, the RPN proposes little that overlaps an object at first, so the box and mask
    heads see few positives besides the ground-truth boxes themselves. Jittered copies give them many
    varied positives, and some near-miss negatives, from the first step (the idea of DN-DETR's noised
    ground-truth queries); they are matched to the objects like any proposal."""
    repeated = boxes.repeat(copies, 1)
    size = repeated[:, 2:] - repeated[:, :2]
    noise = torch.randn(len(repeated), 4, generator=generator, device=boxes.device, dtype=boxes.dtype) * GT_JITTER_STD
    centre = (repeated[:, :2] + repeated[:, 2:]) * 0.5 + noise[:, :2] * size
    half = size * torch.exp(noise[:, 2:]) * 0.5
    return torch.cat((centre - half, centre + half), 1).clamp(min=0)


def box_losses(class_logits: torch.Tensor, box_deltas: torch.Tensor, samples: list[dict],
               box_coder) -> dict[str, tuple[torch.Tensor, int]]:
    labels = torch.cat([s["labels"] for s in samples])
    targets = box_coder.encode(torch.cat([s["matched_gt"] for s in samples]),
                               torch.cat([s["boxes"] for s in samples]))
    pos = torch.where(labels > 0)[0]
    per_class = box_deltas.reshape(len(labels), -1, 4)
    box_loss = F.smooth_l1_loss(per_class[pos, labels[pos]], targets[pos], beta=SMOOTH_L1_BETA, reduction="sum")
    return {"loss_classifier": (F.cross_entropy(class_logits, labels, reduction="sum"), labels.numel()),
            "loss_box_reg": (box_loss, labels.numel())}


def mask_loss(mask_logits: torch.Tensor, samples: list[dict], positive: list[torch.Tensor],
              targets: list[dict]) -> tuple[torch.Tensor, int]:
    """BCE between the predicted mask of the true class, (K, 28, 28) logits, and the ground-truth mask
    cropped to the proposal and resampled to 28x28 (RoIAlign on the full-resolution mask)."""
    size = mask_logits.shape[-1]
    crops = []
    for s, p, t in zip(samples, positive, targets):
        boxes, index = s["boxes"][p], s["gt_index"][p]
        if len(boxes) == 0:
            continue
        rois = torch.cat((index[:, None].to(boxes.dtype), boxes), dim=1)
        crops.append(roi_align(t["masks"][:, None].to(boxes.dtype), rois, (size, size), 1.0)[:, 0])
    if not crops:
        return mask_logits.sum() * 0, 0
    loss = F.binary_cross_entropy_with_logits(mask_logits, torch.cat(crops), reduction="sum")
    return loss, mask_logits.numel()


def keypoint_loss(heatmaps: torch.Tensor, samples: list[dict], positive: list[torch.Tensor],
                  targets: list[dict]) -> tuple[torch.Tensor, int]:
    """Cross-entropy over the (S, S) heatmap cells of each visible keypoint inside its positive proposal,
    (K, keypoints, S, S) logits; the target cell is where the matched object's keypoint falls
    (keypoints.heatmap_targets, torchvision's encoding). Summed, with the number of counted keypoints."""
    n, k, size, _ = heatmaps.shape
    cells, valid = [], []
    for s, p, t in zip(samples, positive, targets):
        c, v = heatmap_targets(t["keypoints"][s["gt_index"][p]], s["boxes"][p], size)
        cells.append(c.reshape(-1))
        valid.append(v.reshape(-1))
    cells, valid = torch.cat(cells), torch.cat(valid)
    if not bool(valid.any()):
        return heatmaps.sum() * 0, 0
    logits = heatmaps.reshape(n * k, size * size)[valid]
    return F.cross_entropy(logits, cells[valid], reduction="sum"), int(valid.sum())
