"""Region proposal network: scores every anchor as object/background, refines it, keeps the best few."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.onnx.operators import shape_as_tensor

from .anchors import AnchorGenerator
from .boxes import BoxCoder, clip_boxes, nms_per_group, nonempty
from .layers import ConvNormAct, full_precision


class RPNHead(nn.Module):
    """Shared conv(s), then per anchor one objectness logit and four box deltas."""

    def __init__(self, channels: int, num_anchors: int, conv_depth: int = 1):
        super().__init__()
        self.conv = nn.Sequential(*(ConvNormAct(channels, channels, 3) for _ in range(conv_depth)))
        self.objectness = nn.Conv2d(channels, num_anchors, 1)
        self.box_deltas = nn.Conv2d(channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: objectness (N, H*W*A) and deltas (N, H*W*A, 4), in the anchors' order."""
        logits, deltas = [], []
        for x in features:
            for conv in self.conv:
                x = conv(x, "separate")  # no norm in these convs: nothing to fold
            n, _, h, w = x.shape
            a = self.objectness.out_channels
            objectness, box_deltas = full_precision((self.objectness, self.box_deltas), x)
            logits.append(objectness.permute(0, 2, 3, 1).reshape(n, -1))
            deltas.append(box_deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        return logits, deltas


@dataclass
class RPNConfig:
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    min_size: float = 1e-3
    score_thresh: float = 0.0
    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5


@dataclass
class RPNOutputs:
    objectness: torch.Tensor  # (N, total anchors) logits
    deltas: torch.Tensor      # (N, total anchors, 4)
    anchors: torch.Tensor     # (total anchors, 4), shared by all images of the batch


class RegionProposalNetwork(nn.Module):
    def __init__(self, head: RPNHead, anchors: AnchorGenerator, config: RPNConfig):
        super().__init__()
        self.head = head
        self.anchor_generator = anchors
        self.config = config
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))

    def forward(self, features: list[torch.Tensor], image_sizes: list, batch_shape: tuple[int, int],
                traceable: bool = False) -> tuple[list[torch.Tensor], "RPNOutputs"]:
        """Proposals per image, plus the raw per-anchor outputs that the training losses need.

        traceable=True (an exported graph, see `maskrcnn.export.graph`): the image sizes are (2,) float
        tensors and every count that depends on the input is read with tensor ops, so a trace keeps it."""
        logits, deltas = self.head(features)
        anchors = self.anchor_generator(batch_shape, [f.shape[-2:] for f in features], features[0].device,
                                        cache=not traceable)
        proposals = self.select_proposals(logits, deltas, anchors, image_sizes, traceable)
        return proposals, RPNOutputs(torch.cat(logits, 1), torch.cat(deltas, 1), torch.cat(anchors))

    @torch.no_grad()
    def select_proposals(self, logits: list[torch.Tensor], deltas: list[torch.Tensor],
                         anchors: list[torch.Tensor], image_sizes: list,
                         traceable: bool = False) -> list[torch.Tensor]:
        """Top-k anchors per level by objectness, decoded, clipped, then NMS per level per image."""
        boxes, scores, levels = self.candidates(logits, deltas, anchors, traceable)
        return [self.suppress(b, s, levels, size, traceable)[0] for b, s, size in zip(boxes, scores, image_sizes)]

    @torch.no_grad()
    def candidates(self, logits: list[torch.Tensor], deltas: list[torch.Tensor], anchors: list[torch.Tensor],
                   traceable: bool = False):
        """The pre-NMS proposals: (N, K, 4) boxes, (N, K) objectness probabilities, (K,) FPN level of each.

        Decoding only the top-k anchors per level (not all ~250k) gives the same boxes for a fraction of
        the work. k is at most the level's anchor count: a Python number, or with `traceable` a tensor read
        off the shape (a level of a small image may have fewer anchors than the traced one)."""
        pre_n = self.config.pre_nms_top_n_train if self.training else self.config.pre_nms_top_n_test
        scores, boxes, levels = [], [], []
        for level, (lg, dl, an) in enumerate(zip(logits, deltas, anchors)):
            k = torch.clamp(shape_as_tensor(lg)[1], max=pre_n) if traceable else min(pre_n, lg.shape[1])
            top_scores, idx = lg.detach().float().topk(k, dim=1)
            top_deltas = torch.gather(dl.detach().float(), 1, idx[..., None].expand(-1, -1, 4))
            top_boxes = self.box_coder.decode(top_deltas.reshape(-1, 4), an[idx.reshape(-1)])
            scores.append(top_scores)
            boxes.append(top_boxes.reshape(idx.shape[0], -1, 4))
            levels.append(torch.full_like(idx[0], level))
        return torch.cat(boxes, dim=1), torch.sigmoid(torch.cat(scores, dim=1)), torch.cat(levels)

    @torch.no_grad()
    def suppress(self, boxes: torch.Tensor, scores: torch.Tensor, levels: torch.Tensor, image_size,
                 traceable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's candidates -> its proposals (clipped, tiny boxes dropped, NMS within each level)."""
        cfg = self.config
        post_n = cfg.post_nms_top_n_train if self.training else cfg.post_nms_top_n_test
        boxes = clip_boxes(boxes, image_size)
        keep = nonempty(boxes, cfg.min_size)
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        if cfg.score_thresh > 0:
            keep = torch.where(scores >= cfg.score_thresh)[0]
            boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = nms_per_group(boxes, scores, levels, cfg.nms_thresh, image_size, traceable)[:post_n]
        return boxes[keep], scores[keep]
