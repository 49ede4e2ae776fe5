"""Shared fixtures: real COCO images and torchvision reference models with seeded random weights.

No pretrained weights exist offline, so parity is shown on random models whose classifier is scaled up
so that many detections pass the score threshold, as a trained model's would on a busy image.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

COCO_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini"


def coco_mini() -> Path:
    if not COCO_MINI.is_dir():
        pytest.fail(f"real test data not found at {COCO_MINI} (expected ../shared/data/coco-mini)")
    return COCO_MINI


def read_rgb(path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


# Classifier weight scale giving ~100 detections per COCO image with scores spread over (0.05, 1).
CLASSIFIER_SCALE = {"v1": 0.4, "v2": 0.06}


def torchvision_reference(version: str, num_classes: int = 91, seed: int = 0, classifier_scale: float | None = None):
    """torchvision's Mask R-CNN built as its COCO checkpoints are (v1: frozen BN backbone), random weights,
    randomised norm statistics so that every normalisation layer matters."""
    classifier_scale = classifier_scale or CLASSIFIER_SCALE[version]
    from torchvision.models import resnet50
    from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn_v2
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import misc

    torch.manual_seed(seed)
    if version == "v1":
        backbone = _resnet_fpn_extractor(resnet50(norm_layer=misc.FrozenBatchNorm2d), 3)
        model = MaskRCNN(backbone, num_classes=num_classes)
    else:
        model = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=num_classes)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(classifier_scale)
        for m in model.modules():
            if getattr(m, "running_var", None) is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def val_images() -> list[Path]:
    return sorted((coco_mini() / "val2017").glob("*.jpg"))
