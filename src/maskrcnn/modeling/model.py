"""Mask R-CNN (He et al. 2017) as a short composition of its stages:

    images -> transform -> backbone -> FPN -> RPN proposals -> box branch -> detections
           -> mask branch -> masks pasted into the input image
           -> keypoint branch (Keypoint R-CNN; ModelConfig.keypoints > 0) -> keypoints in the input image
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from ..checks import COUNT, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, PROBABILITY, Each, Number, check_fields
from .anchors import AnchorGenerator
from .backbone import ResNet
from .box_head import BoxPredictor, ConvFCBoxHead, MLPBoxHead, SplitMLPBoxHead
from .boxes import BoxCoder
from .fpn import FPN, pooled_levels
from .keypoint_head import KeypointHead, KeypointPredictor
from .keypoints import heatmaps_to_keypoints, keypoint_names
from .mask_head import MaskHead, MaskPredictor
from .plan import PRECISIONS, Plan, inference_plan
from .poolers import MultiLevelRoIAlign
from .postprocess import MASK_PASTE_MODES, select_detections, to_input_pixels
from .rpn import RegionProposalNetwork, RPNConfig, RPNHead
from .settings import InferenceSettings
from .transform import ImageTransform


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; saved inside our checkpoints (the field names are the stored
    format: old checkpoints must keep loading, so fields are never renamed).

    Three kinds of fields, grouped below:
    - architecture: defined by the weights; changing one needs other weights (or breaks loading);
    - training only: sampling and loss choices, read by `training_losses`, ignored when predicting;
    - inference defaults: what `MaskRCNN.predict` uses when no `InferenceSettings` is passed.
      score_thresh, nms_thresh and detections_per_img (with `MaskRCNN.precision`) are the defaults of
      `InferenceSettings`, overridable per call; min_size / max_size (input resizing), mask_paste and
      rpn.pre/post_nms_top_n_test, rpn.nms_thresh, rpn.min_size, rpn.score_thresh are set per model
      (`maskrcnn.load(..., mask_paste=, proposals=)`); the RPN's *_train and sampling fields are training only.
    """

    # --- architecture (defined by the weights)
    depth: int = 50
    num_classes: int = 91
    backbone_norm: str = "frozen_bn"     # frozen_bn (fine-tuning) | bn | gn (training from scratch)
    frozen_stages: int = 2               # stem + layer1 get no gradients when fine-tuning
    fpn_norm: str | None = None
    fpn_channels: int = 256
    rpn_conv_depth: int = 1
    box_head: str = "mlp"                # mlp (2fc) | split_mlp (2fc for classes, 2fc for boxes) | conv (4conv + 1fc)
    head_norm: str | None = None         # norm in the conv box head, the mask head and the keypoint head
    mlp_head_norm: str | None = None     # norm after each fully connected layer of the (split) mlp head: bn | gn
    box_head_hidden: int = 1024
    box_sampling_ratio: int = 2          # RoIAlign sample points per bin side for the box head (torchvision: 2)
    mask_sampling_ratio: int = 2         # the same for the mask head
    mask_head_channels: int = 256
    masks: bool = True                   # the mask branch (False: a box + keypoint model, as torchvision's)
    keypoints: int = 0                   # keypoints per object of the keypoint branch (0: no keypoint branch)
    keypoint_sampling_ratio: int = 2     # RoIAlign sample points per bin side for the keypoint head
    keypoint_head_channels: int = 512
    keypoint_head_convs: int = 8         # 3x3 convs of the keypoint head (torchvision: 8 of 512 channels)
    # what the keypoints are, stored with the weights as the class names are: names (empty: keypoint_<i>)
    # and the skeleton's edges as pairs of 1-based keypoint indices (COCO's convention), for drawing
    keypoint_names: tuple[str, ...] = ()
    skeleton: tuple[tuple[int, int], ...] = ()
    # --- inference defaults set per model (input resizing; a tuple of min_size: random choice in training)
    min_size: int | tuple[int, ...] = 800
    max_size: int = 1333
    # --- architecture: the normalisation and anchors the weights were trained with
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn: RPNConfig = field(default_factory=RPNConfig)  # mixed: *_test per-model inference defaults, the rest training
    # --- training only
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    mask_rois_per_image: int | None = None  # training: mask loss on at most this many positives (None: all)
    gt_jitter_copies: int = 0            # training: jittered copies of each ground-truth box join the proposals
    # --- inference defaults, overridable per call with InferenceSettings
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    # --- inference default set per model
    mask_paste: str = "torchvision"      # torchvision (bit-parity) | exact (sub-pixel; postprocess.paste_masks)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        data = dict(data)
        if isinstance(data.get("rpn"), dict):
            data["rpn"] = RPNConfig(**data["rpn"])
        for key in ("image_mean", "image_std", "anchor_sizes", "aspect_ratios"):
            if key in data:
                data[key] = tuple(data[key])
        if isinstance(data.get("min_size"), list):
            data["min_size"] = tuple(data["min_size"])
        if "keypoint_names" in data:
            data["keypoint_names"] = tuple(data["keypoint_names"])
        if "skeleton" in data:
            data["skeleton"] = tuple(tuple(edge) for edge in data["skeleton"])
        return cls(**data)


def _v1(depth: int) -> dict:
    return dict(depth=depth)


ARCHS: dict[str, dict] = {
    "resnet18_fpn": _v1(18),
    "resnet34_fpn": _v1(34),
    "resnet50_fpn": _v1(50),
    "resnet101_fpn": _v1(101),
    # torchvision's "v2" recipe: BN everywhere, two-conv RPN head, 4conv+1fc box head, normed mask head.
    "resnet50_fpn_v2": dict(depth=50, backbone_norm="bn", fpn_norm="bn", rpn_conv_depth=2, box_head="conv",
                            head_norm="bn"),
}


def arch_config(arch: str, num_classes: int = 91, **options) -> ModelConfig:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
    merged = {**ARCHS[arch], "num_classes": num_classes, **options}
    if isinstance(merged.get("rpn"), dict):
        merged["rpn"] = RPNConfig(**merged["rpn"])
    return ModelConfig(**merged)


def build_model(arch: str = "resnet50_fpn", num_classes: int = 91, **options) -> "MaskRCNN":
    """A randomly initialised model. `options` override any `ModelConfig` field, e.g. backbone_norm="gn"."""
    return MaskRCNN(arch_config(arch, num_classes, **options))


# The numeric settings' ranges (maskrcnn.checks). A model checks its config when built, and `maskrcnn train`
# checks --model-option and config-file overrides with the same table before any work starts.
_MODEL_RULES = {
    "num_classes": COUNT, "frozen_stages": NON_NEGATIVE_INT, "fpn_channels": COUNT,
    "rpn_conv_depth": NON_NEGATIVE_INT, "box_head_hidden": COUNT, "box_sampling_ratio": COUNT,
    "mask_sampling_ratio": COUNT, "mask_head_channels": COUNT, "max_size": COUNT,
    "keypoints": NON_NEGATIVE_INT, "keypoint_sampling_ratio": COUNT, "keypoint_head_channels": COUNT,
    "keypoint_head_convs": COUNT,
    "box_fg_iou_thresh": PROBABILITY, "box_bg_iou_thresh": PROBABILITY, "box_batch_size_per_image": COUNT,
    "box_positive_fraction": PROBABILITY, "mask_rois_per_image": COUNT, "gt_jitter_copies": NON_NEGATIVE_INT,
    "score_thresh": PROBABILITY, "nms_thresh": PROBABILITY, "detections_per_img": COUNT,
    "min_size": Each(COUNT), "anchor_sizes": Each(POSITIVE), "aspect_ratios": Each(POSITIVE),
    "image_std": Each(POSITIVE), "image_mean": Each(Number()),
}
_OPTIONAL = {"mask_rois_per_image"}  # None: every positive gets a mask loss
_RPN_RULES = {
    "pre_nms_top_n_train": COUNT, "pre_nms_top_n_test": COUNT, "post_nms_top_n_train": COUNT,
    "post_nms_top_n_test": COUNT, "nms_thresh": PROBABILITY, "min_size": NON_NEGATIVE,
    "score_thresh": PROBABILITY, "fg_iou_thresh": PROBABILITY, "bg_iou_thresh": PROBABILITY,
    "batch_size_per_image": COUNT, "positive_fraction": PROBABILITY,
}


def model_setting_problems(options: dict) -> list[str]:
    """One sentence per ModelConfig setting in `options` (all of them, or just some overrides) that is
    unknown or out of range; the nested `rpn` settings are named `rpn.KEY`."""
    known = {f.name for f in fields(ModelConfig)}
    problems = [f"unknown model setting {key!r}" for key in options if key not in known]
    problems += check_fields(options, _MODEL_RULES, optional=_OPTIONAL)
    if "rpn" in options:
        rpn = asdict(options["rpn"]) if isinstance(options["rpn"], RPNConfig) else options["rpn"]
        if not isinstance(rpn, dict):
            return problems + [f"rpn must be a mapping of RPN settings, got {rpn!r}"]
        rpn_known = {f.name for f in fields(RPNConfig)}
        problems += [f"unknown model setting 'rpn.{key}'" for key in rpn if key not in rpn_known]
        problems += check_fields(rpn, _RPN_RULES, prefix="rpn.")
    return problems + _keypoint_problems(options)


def _keypoint_problems(options: dict) -> list[str]:
    """The branch switches and the keypoint names / skeleton against the keypoint count; with only some
    settings (overrides, merged with the dataset's keypoints later), what needs the count waits for it."""
    problems = []
    if not isinstance(options.get("masks", True), bool):
        problems.append(f"masks must be true or false, got {options['masks']!r}")
    count = options.get("keypoints")
    if not isinstance(count, int) or isinstance(count, bool):
        return problems  # not given here, or already reported by the numeric rules
    if options.get("masks") is False and count == 0:
        problems.append("a model needs a mask branch (masks) or a keypoint branch (keypoints > 0)")
    names = options.get("keypoint_names", ())
    if names and len(names) != count:
        problems.append(f"keypoint_names has {len(names)} names for keypoints={count}")
    for edge in options.get("skeleton", ()):
        if len(edge) != 2 or not all(isinstance(i, int) and 1 <= i <= count for i in edge):
            problems.append(f"skeleton edge {list(edge)} is not a pair of keypoint numbers 1..{count}")
            break
    return problems


class MaskRCNN(nn.Module):
    PRECISIONS = PRECISIONS
    MASK_OUTPUTS = ("image", "crops")

    def __init__(self, config: ModelConfig, class_names: list[str] | None = None,
                 category_ids: list[int] | None = None):
        super().__init__()
        c = config
        problems = model_setting_problems(c.to_dict())
        if problems:
            raise ValueError("; ".join(problems))
        self.config = c
        # Default inference arithmetic (InferenceSettings.precision overrides it per call): "fp32" reproduces
        # torchvision; "bf16" (CPU or GPU) and "fp16" (GPU) run the convolutions and matmuls in half width
        # under autocast, while box decoding, NMS and mask pasting stay in fp32.
        self.precision = "fp32"
        self.class_names = class_names or ["__background__"] + [f"class_{i}" for i in range(1, c.num_classes)]
        self.category_ids = category_ids or list(range(c.num_classes))
        self.transform = ImageTransform(c.min_size, c.max_size, c.image_mean, c.image_std)
        self.backbone = ResNet(c.depth, c.backbone_norm, c.frozen_stages)
        self.fpn = FPN(self.backbone.out_channels, c.fpn_channels, c.fpn_norm)
        anchors = AnchorGenerator(c.anchor_sizes, c.aspect_ratios)
        self.rpn = RegionProposalNetwork(RPNHead(c.fpn_channels, anchors.num_anchors_per_location,
                                                 c.rpn_conv_depth), anchors, c.rpn)
        self.box_pooler = MultiLevelRoIAlign(7, sampling_ratio=c.box_sampling_ratio)
        if c.box_head == "mlp":
            self.box_head = MLPBoxHead(c.fpn_channels, 7, c.box_head_hidden, norm=c.mlp_head_norm)
        elif c.box_head == "split_mlp":
            self.box_head = SplitMLPBoxHead(c.fpn_channels, 7, c.box_head_hidden, norm=c.mlp_head_norm)
        elif c.box_head == "conv":
            self.box_head = ConvFCBoxHead(c.fpn_channels, 7, hidden=c.box_head_hidden, norm=c.head_norm)
        else:
            raise ValueError(f"unknown box head {c.box_head!r}; choose 'mlp', 'split_mlp' or 'conv'")
        if c.mask_paste not in MASK_PASTE_MODES:
            raise ValueError(f"unknown mask_paste {c.mask_paste!r}; choose one of {MASK_PASTE_MODES}")
        self.box_predictor = BoxPredictor(self.box_head.out_features, c.num_classes)
        self.box_coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
        if c.masks:
            self.mask_pooler = MultiLevelRoIAlign(14, sampling_ratio=c.mask_sampling_ratio)
            self.mask_head = MaskHead(c.fpn_channels, c.mask_head_channels, norm=c.head_norm)
            self.mask_predictor = MaskPredictor(c.mask_head_channels, c.num_classes, c.mask_head_channels)
        if c.keypoints:
            self.keypoint_pooler = MultiLevelRoIAlign(14, sampling_ratio=c.keypoint_sampling_ratio)
            self.keypoint_head = KeypointHead(c.fpn_channels, c.keypoint_head_channels, c.keypoint_head_convs,
                                              norm=c.head_norm)
            self.keypoint_predictor = KeypointPredictor(c.keypoint_head_channels, c.keypoints)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def keypoint_names(self) -> list[str]:
        """The keypoints' names (keypoint_<i> where the weights came without them); [] without keypoints."""
        return keypoint_names(self.config)

    @property
    def skeleton(self) -> list[tuple[int, int]]:
        """Pairs of 1-based keypoint numbers joined when drawing (COCO's convention)."""
        return [tuple(edge) for edge in self.config.skeleton]

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None,
                generators: list[torch.Generator] | None = None):
        """Eval: list of (3,H,W) float images in [0,1] -> one dict per image with boxes, labels, scores and
        masks (N,1,H,W probabilities), all in input pixels. Training: images and targets (boxes, labels,
        masks) -> dict of losses; `generators`, one per image, make the sampling reproducible."""
        if self.training:
            if targets is None:
                raise ValueError("training mode needs targets (call model.eval() for inference)")
            from .losses import training_losses

            return training_losses(self, images, targets, generators)
        return self.predict(images)

    def features(self, batch: torch.Tensor, plan: Plan) -> list[torch.Tensor]:
        """P2..P6 for a normalised, padded batch."""
        return self.fpn(self.backbone(batch, plan.norms), plan.norms)

    def inference_settings(self, **overrides) -> InferenceSettings:
        """This model's default InferenceSettings (its config's thresholds and `precision`), with any
        non-None `overrides` (score_thresh, nms_thresh, detections_per_img, precision) applied."""
        return InferenceSettings.defaults_of(self).with_overrides(**overrides)

    @staticmethod
    def _autocast(device: torch.device, precision: str):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor], masks: str = "image",
                mask_threshold: float | None = None,
                settings: InferenceSettings | None = None) -> list[dict]:
        """What eval-mode `forward` returns. `settings` (score threshold, NMS threshold, detections per
        image, precision) apply to this call only; None: the model's defaults (`inference_settings()`).
        masks="crops" pastes each mask only into the part of the image it can cover: instead of `masks`
        (N, 1, H, W), `mask_crops` (a list of N (h_i, w_i) probability tensors, 0 outside them),
        `mask_offsets` (N, 2) int64 (row, column of each crop's top-left pixel) and `image_size` (H, W);
        the same values, for the crops' memory instead of N x H x W floats. With a `mask_threshold` the crops
        are boolean (probability >= threshold) as soon as each is pasted. A model without a mask branch
        (config.masks False) returns no masks (with masks="crops", only `image_size`); one with a keypoint
        branch adds `keypoints` (N, K, 3) = x, y, 1 in input pixels and `keypoints_scores` (N, K), the
        heatmap logit at each keypoint, as torchvision's Keypoint R-CNN."""
        if masks not in self.MASK_OUTPUTS:
            raise ValueError(f"masks must be one of {self.MASK_OUTPUTS}, got {masks!r}")
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        batch, sizes, _ = self.transform(images)
        settings = settings or self.inference_settings()
        plan = inference_plan(settings.precision)  # fp32: torchvision's arithmetic; bf16 / fp16: the fast paths
        if plan.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with self._autocast(batch.device, settings.precision):
            features = self.features(batch, plan)
            proposals, _ = self.rpn(features, sizes, batch.shape[-2:])
            pooled_from = pooled_levels(features)
            if settings.precision != "fp32":
                # RoIAlign runs in fp32: convert each level once for both poolers, not per call; the sparse
                # RoIAlign reads the channels-last maps as they are.
                pooled_from = [f.float() for f in pooled_from]
            detections = self.detect_boxes(pooled_from, proposals, sizes, plan, settings)
            boxes = [d["boxes"] for d in detections]
            if self.config.masks:
                mask_probs = self.predict_masks(pooled_from, boxes, [d["labels"] for d in detections], sizes, plan)
                detections = [{**d, "mask_probs": p} for d, p in zip(detections, mask_probs)]
            if self.config.keypoints:
                keypoints = self.predict_keypoints(pooled_from, boxes, sizes, plan)
                detections = [{**d, "keypoints": k, "keypoints_scores": s} for d, (k, s) in zip(detections, keypoints)]
        return [self.to_input_pixels(d, size, orig, masks, mask_threshold)
                for d, size, orig in zip(detections, sizes, original_sizes)]

    def detect_boxes(self, features: list[torch.Tensor], proposals: list[torch.Tensor],
                     sizes: list[tuple[int, int]], plan: Plan,
                     settings: InferenceSettings | None = None) -> list[dict[str, torch.Tensor]]:
        """The final boxes per image; `settings` None: the model's defaults."""
        pooled = self.box_pooler(features, proposals, sizes, plan.roi_align)
        class_logits, box_deltas = self.box_predictor(self.box_head(pooled, plan.norms))
        s = settings or self.inference_settings()
        return select_detections(class_logits.float(), box_deltas.float(), proposals, sizes, self.box_coder,
                                 score_thresh=s.score_thresh, nms_thresh=s.nms_thresh,
                                 detections_per_img=s.detections_per_img)

    def predict_masks(self, features: list[torch.Tensor], boxes: list[torch.Tensor], labels: list[torch.Tensor],
                      sizes: list[tuple[int, int]], plan: Plan) -> list[torch.Tensor]:
        """Per image, the mask probabilities (K_i, 28, 28) of its boxes: the sigmoid of the labelled class's
        mask logits. plan.mask_classes="all" computes every class's logits and picks (as torchvision:
        bit-identical masks), "detected" only the labelled class's (less work)."""
        if sum(len(b) for b in boxes) == 0:
            return [features[0].new_zeros((0, 28, 28)) for _ in boxes]
        flat_labels = torch.cat(labels)
        pooled = self.mask_pooler(features, boxes, sizes, plan.roi_align)
        if plan.mask_head_channels_last:
            pooled = pooled.contiguous(memory_format=torch.channels_last)
        mask_features = self.mask_head(pooled, plan.norms)
        if plan.mask_classes == "all":
            logits = self.mask_predictor(mask_features, plan.mask_upsampling)
            logits = logits[torch.arange(len(flat_labels), device=flat_labels.device), flat_labels]
        else:
            logits = self.mask_predictor(mask_features, plan.mask_upsampling, labels=flat_labels)
        return list(logits.float().sigmoid().split([len(b) for b in boxes]))

    def predict_keypoints(self, features: list[torch.Tensor], boxes: list[torch.Tensor],
                          sizes: list[tuple[int, int]], plan: Plan) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, its boxes' keypoints (K_i, keypoints, 3) = (x, y, 1) in resized-image pixels and their
        scores (K_i, keypoints): the heatmap logit at each keypoint."""
        k = self.config.keypoints
        if sum(len(b) for b in boxes) == 0:
            return [(features[0].new_zeros((0, k, 3)), features[0].new_zeros((0, k))) for _ in boxes]
        pooled = self.keypoint_pooler(features, boxes, sizes, plan.roi_align)
        heatmaps = self.keypoint_predictor(self.keypoint_head(pooled, plan.norms))
        return [heatmaps_to_keypoints(maps, b) for maps, b in zip(heatmaps.split([len(b) for b in boxes]), boxes)]

    def to_input_pixels(self, det: dict, size: tuple[int, int], original: tuple[int, int],
                        masks: str = "image", mask_threshold: float | None = None) -> dict:
        return to_input_pixels(det, size, original, self.config.mask_paste, masks, mask_threshold)
