"""The traceable detection graph, `DetectionGraph`: from one normalised image, zero-padded to a multiple of
32, to its detections and their 28x28 mask probabilities, so that ONNX and TorchScript hold the same graph.
Every step is the eager model's own code (`modeling/`), called with traceable=True where tracing needs
another form (sizes as tensors, no data-dependent branches). Resizing before it and pasting masks after it
are `runtime.py`'s, with the eager model's functions too.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.fpn import pooled_levels
from ..modeling.model import MaskRCNN
from ..modeling.plan import TORCHVISION
from ..modeling.poolers import MultiLevelRoIAlign
from ..modeling.postprocess import select_detections


class DetectionGraph(nn.Module):
    """`MaskRCNN.predict` for one padded image, written so that tracing records every data-dependent step.

    A trace keeps tensor operations and freezes Python values. So the sizes that depend on the input
    (how many anchors a level has, how many boxes pass a filter) are read with tensor ops, empty
    selections go through the same ops as full ones instead of being skipped by an `if`, and the score
    threshold and detection limit are graph inputs so that a file serves any --score-thresh.

    Inputs: image (1, 3, H, W) normalised and padded; image_size (2,) int64 height and width before the
    padding; score_thresh () float32; max_detections () int64.
    Outputs (`runtime.OUTPUT_NAMES`), in the resized image's pixels, best first: boxes (K, 4), scores (K,),
    labels (K,) int64, then one output per head on the detections (`heads`): mask_probs (K, 28, 28), the
    sigmoid of the detected class's mask logits, with a mask branch; keypoint_heatmaps (K, keypoints, 56,
    56) logits with a keypoint branch (`runtime.output_names`).
    """

    def __init__(self, model: MaskRCNN):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, image_size: torch.Tensor, score_thresh: torch.Tensor,
                max_detections: torch.Tensor):
        m = self.model
        size = image_size.to(torch.float32)
        features = m.features(image, TORCHVISION)  # torchvision's arithmetic, as the fp32 eager model
        proposals = m.rpn(features, [size], image.shape[-2:], traceable=True)[0][0]
        boxes, scores, labels = self.detections(pooled_levels(features), proposals, size, score_thresh,
                                                max_detections)
        return (boxes, scores, labels, *self.heads(pooled_levels(features), boxes, labels, size))

    def detections(self, features: list[torch.Tensor], proposals: torch.Tensor, size: torch.Tensor,
                   score_thresh: torch.Tensor, max_detections: torch.Tensor):
        """MaskRCNN.detect_boxes for one image, with the limits as graph inputs."""
        m = self.model
        pooled = self.pool(features, proposals, m.box_pooler, size[0])
        class_logits, box_deltas = m.box_predictor(m.box_head(pooled, TORCHVISION.norms))
        found = select_detections(class_logits, box_deltas, [proposals], [size], m.box_coder,
                                  score_thresh=score_thresh, nms_thresh=m.config.nms_thresh,
                                  detections_per_img=max_detections, traceable=True)[0]
        return found["boxes"], found["scores"], found["labels"]

    def heads(self, features: list[torch.Tensor], boxes: torch.Tensor, labels: torch.Tensor,
              size: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs after boxes, scores and labels, one per head on the detections, in
        `runtime.output_names`' order: mask_probs with a mask branch, keypoint_heatmaps with a keypoint one."""
        m = self.model
        outputs = (self.mask_probs(features, boxes, labels, size),) if m.config.masks else ()
        if m.config.keypoints:  # (K, keypoints, 56, 56) logits, decoded after the graph as the eager model does
            pooled = self.pool(features, boxes, m.keypoint_pooler, size[0])
            outputs += (m.keypoint_predictor(m.keypoint_head(pooled, TORCHVISION.norms)),)
        return outputs

    def mask_probs(self, features: list[torch.Tensor], boxes: torch.Tensor, labels: torch.Tensor,
                   size: torch.Tensor) -> torch.Tensor:
        """MaskRCNN.predict_masks for one image with plan TORCHVISION (every class's logits, then the
        detected one's), without its early return on no boxes."""
        m = self.model
        pooled = self.pool(features, boxes, m.mask_pooler, size[0])
        mask_features = m.mask_head(pooled, TORCHVISION.norms)
        mask_logits = m.mask_predictor(mask_features, TORCHVISION.mask_upsampling)
        return mask_logits[torch.arange(labels.shape[0]), labels].sigmoid()

    @staticmethod
    def pool(features: list[torch.Tensor], boxes: torch.Tensor, pooler: MultiLevelRoIAlign,
             height: torch.Tensor) -> torch.Tensor:
        """The pooler (`MultiLevelRoIAlign.pool`, traceable) on one image's boxes; `height`: its resized
        height, a 0-d float tensor."""
        rois = torch.cat((torch.zeros_like(boxes[:, :1]), boxes), dim=1)
        return pooler.pool(features, rois, height, TORCHVISION.roi_align, traceable=True)
