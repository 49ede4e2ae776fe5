"""torchvision's Mask R-CNN as the reference our model is tested and timed against (never imported by the
package). No pretrained weights exist offline, so the reference gets seeded random weights, randomised
normalisation statistics (so every norm layer matters) and a classifier scaled so that ~100 detections per
busy COCO image pass the 0.05 score threshold with scores spread over (0.05, 1), as a trained model's are."""

from __future__ import annotations

import torch

CLASSIFIER_SCALE = {"v1": 0.4, "v2": 0.06}


def torchvision_reference(version: str = "v1", num_classes: int = 91, seed: int = 0,
                          classifier_scale: float | None = None) -> torch.nn.Module:
    """v1 is built as torchvision builds it for its COCO checkpoint (frozen-BN backbone); v2 as published."""
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn_v2
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc

    classifier_scale = classifier_scale or CLASSIFIER_SCALE[version]
    torch.manual_seed(seed)
    if version == "v1":
        backbone = _resnet_fpn_extractor(resnet50(norm_layer=misc.FrozenBatchNorm2d), 3)
        model = MaskRCNN(backbone, num_classes=num_classes)
    elif version == "v2":
        model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes)
    else:
        raise ValueError(f"version must be v1 or v2, got {version!r}")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(classifier_scale)
        randomise_norm_statistics(model, g)
    return model.eval()


def torchvision_keypoint_reference(seed: int = 0, classifier_scale: float = 0.4, person_bias: float | None = None,
                                   masks: bool = False) -> torch.nn.Module:
    """torchvision's Keypoint R-CNN (person + 17 COCO keypoints, box and keypoint heads, no masks), built as
    keypointrcnn_resnet50_fpn(weights=None) builds it (trainable BatchNorm backbone), with seeded random
    weights, randomised normalisation statistics and a scaled classifier as above; `person_bias` raises the
    person logit (None: +3, or -3 with masks, whose seeded classifier favours persons) so that busy photos get
    dozens of detections with spread scores (with two classes, scaling alone does not).
    masks=True: torchvision's Mask R-CNN with the same keypoint branch added to its RoI heads (both heads)."""
    from torchvision.models.detection import keypointrcnn_resnet50_fpn, maskrcnn_resnet50_fpn
    from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(seed)
    if masks:
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2)
        model.roi_heads.keypoint_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, sampling_ratio=2)
        model.roi_heads.keypoint_head = KeypointRCNNHeads(256, (512,) * 8)
        model.roi_heads.keypoint_predictor = KeypointRCNNPredictor(512, 17)
    else:
        model = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(classifier_scale)
        model.roi_heads.box_predictor.cls_score.bias[1] += (-3.0 if masks else 3.0) if person_bias is None else person_bias
        randomise_norm_statistics(model, g)
    return model.eval()


def randomise_norm_statistics(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Running means in [-0.1, 0.1) and variances in [0.5, 1.5), so that every norm layer matters."""
    for m in model.modules():
        if getattr(m, "running_var", None) is not None:
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=generator) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
