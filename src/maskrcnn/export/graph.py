"""The traceable detection graph, `DetectionGraph`: from one normalised image, zero-padded to a multiple of
32, to its detections and their 28x28 mask probabilities, written with tensor arithmetic only (sizes are
graph inputs, not Python numbers a trace would freeze), so that ONNX and TorchScript hold the same graph.
Resizing before it and pasting masks after it are `runtime.py`'s (numpy).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.onnx.operators import shape_as_tensor
from torchvision.ops import nms

from ..modeling.fpn import pooled_levels
from ..modeling.model import MaskRCNN
from ..modeling.plan import TORCHVISION
from ..modeling.poolers import level_of_boxes, roi_align



class DetectionGraph(nn.Module):
    """`MaskRCNN.predict` for one padded image, written so that tracing records every data-dependent step.

    A trace keeps tensor operations and freezes Python values. So the sizes that depend on the input
    (how many anchors a level has, how many boxes pass a filter) are read with tensor ops, empty
    selections go through the same ops as full ones instead of being skipped by an `if`, and the score
    threshold and detection limit are graph inputs so that a file serves any --score-thresh.

    Inputs: image (1, 3, H, W) normalised and padded; image_size (2,) int64 height and width before the
    padding; score_thresh () float32; max_detections () int64.
    Outputs, in the resized image's pixels, best first: boxes (K, 4), scores (K,), labels (K,) int64,
    mask_probs (K, 28, 28) — the sigmoid of the detected class's mask logits — with a mask branch, and
    keypoint_heatmaps (K, keypoints, 56, 56) logits with a keypoint branch (runtime.output_names).
    """

    def __init__(self, model: MaskRCNN):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, image_size: torch.Tensor, score_thresh: torch.Tensor,
                max_detections: torch.Tensor):
        m = self.model
        size = image_size.to(torch.float32)
        features = m.features(image, TORCHVISION)  # torchvision's arithmetic, as the fp32 eager model
        proposals = self.proposals(image, features, size)
        boxes, scores, labels = self.detections(pooled_levels(features), proposals, size, score_thresh, max_detections)
        outputs = (boxes, scores, labels)  # then the branches' outputs: runtime.output_names
        if m.config.masks:
            pooled = self.pool(pooled_levels(features), boxes, m.mask_pooler, size[0])
            mask_features = m.mask_head(pooled, TORCHVISION.norms)
            mask_logits = m.mask_predictor(mask_features, TORCHVISION.mask_upsampling)  # every class, as "all"
            outputs += (mask_logits[torch.arange(labels.shape[0]), labels].sigmoid(),)
        if m.config.keypoints:
            pooled = self.pool(pooled_levels(features), boxes, m.keypoint_pooler, size[0])
            outputs += (m.keypoint_predictor(m.keypoint_head(pooled, TORCHVISION.norms)),)
        return outputs

    def proposals(self, image: torch.Tensor, features: list[torch.Tensor], size: torch.Tensor) -> torch.Tensor:
        """RegionProposalNetwork.candidates + suppress for batch 1, with the top-k size read off the shapes."""
        rpn = self.model.rpn
        cfg = rpn.config
        logits, deltas = rpn.head(features)
        all_boxes, all_scores, all_levels = [], [], []
        for level, (lg, dl, feature) in enumerate(zip(logits, deltas, features)):
            anchors = rpn.anchor_generator._grid(image.shape[-2:], feature.shape[-2:],
                                                 rpn.anchor_generator.sizes[level], image.device)
            available = shape_as_tensor(lg)[1]
            k = torch.clamp(available, max=cfg.pre_nms_top_n_test)
            top_scores, idx = lg[0].topk(k)
            boxes = rpn.box_coder.decode(dl[0, idx], anchors[idx])[:, 0]
            all_boxes.append(boxes)
            all_scores.append(top_scores)
            all_levels.append(torch.full_like(idx, level))
        boxes = _clip(torch.cat(all_boxes), size)
        scores = torch.sigmoid(torch.cat(all_scores))
        levels = torch.cat(all_levels)
        keep = _nonempty(boxes, cfg.min_size)
        if cfg.score_thresh > 0:  # a setting, not data: fixed when the graph is built
            keep = keep & (scores >= cfg.score_thresh)
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = _batched_nms(boxes, scores, levels, cfg.nms_thresh, size)[:cfg.post_nms_top_n_test]
        return boxes[keep]

    def detections(self, features: list[torch.Tensor], proposals: torch.Tensor, size: torch.Tensor,
                   score_thresh: torch.Tensor, max_detections: torch.Tensor):
        """postprocess.select_detections for one image."""
        m = self.model
        c = m.config
        pooled = self.pool(features, proposals, m.box_pooler, size[0])
        class_logits, box_deltas = m.box_predictor(m.box_head(pooled, TORCHVISION.norms))
        boxes = _clip(m.box_coder.decode(box_deltas, proposals), size)[:, 1:].reshape(-1, 4)
        scores = torch.softmax(class_logits, -1)[:, 1:].reshape(-1)
        # Candidate i is (proposal i // (classes - 1), class i % (classes - 1) + 1), as in the eager code.
        labels = torch.arange(scores.shape[0]) % (c.num_classes - 1) + 1
        keep = (scores > score_thresh) & _nonempty(boxes, 1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = _batched_nms(boxes, scores, labels, c.nms_thresh, size)
        keep = keep[torch.arange(keep.shape[0]) < max_detections]
        return boxes[keep], scores[keep], labels[keep]

    @staticmethod
    def pool(features: list[torch.Tensor], boxes: torch.Tensor, pooler, height: torch.Tensor) -> torch.Tensor:
        """MultiLevelRoIAlign over P2..P5 for one image, for any number of boxes on any level (0 included).

        Every level runs, also on no boxes, so no branch is traced; each level's result is gathered back into
        the boxes' order (an index_put would be exported as a ScatterND whose reshape fails on an empty
        level). As in the eager pooler, each level's scale is the power of two nearest to its height over the
        resized image's `height`, and the level range follows from those scales: 1/4..1/32 for most images,
        but a very flat one (resized height under ~75 px) gets other powers of two. RoiAlign's scale is an
        attribute of the ONNX node, fixed at export, so the boxes are scaled instead (by a power of two:
        exact, the same sample points)."""
        scales = torch.stack([shape_as_tensor(f)[2] for f in features]).to(torch.float32) / height
        log_scales = torch.round(torch.log2(scales))
        levels = level_of_boxes(boxes, -log_scales[0], -log_scales[-1])
        s = pooler.output_size
        pooled, order = [], []
        for level, feature in enumerate(features):
            idx = torch.where(levels == level)[0]
            scaled = boxes[idx] * 2.0 ** log_scales[level]
            rois = torch.cat((torch.zeros_like(scaled[:, :1]), scaled), dim=1)
            pooled.append(roi_align(feature, rois, s, 1.0, pooler.sampling_ratio, TORCHVISION.roi_align))
            order.append(idx)
        # torch.cat(order) lists the boxes level by level; its argsort puts each result back at its box.
        return torch.cat(pooled)[torch.argsort(torch.cat(order))]


def _clip(boxes: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """boxes.clip_boxes with the image size as a tensor (a graph input, not a constant)."""
    x = torch.minimum(boxes[..., 0::2].clamp(min=0), size[1])
    y = torch.minimum(boxes[..., 1::2].clamp(min=0), size[0])
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def _nonempty(boxes: torch.Tensor, min_size: float) -> torch.Tensor:
    return ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)


def _batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_thresh: float,
                 size: torch.Tensor) -> torch.Tensor:
    """NMS within each group: shifting every group by more than the image is wide and high keeps groups
    apart. (torchvision's batched_nms measures that offset with boxes.max(), which fails on no boxes.)"""
    offsets = groups.to(boxes.dtype)[:, None] * (size.max() + 1)
    return nms(boxes + offsets, scores, iou_thresh)
