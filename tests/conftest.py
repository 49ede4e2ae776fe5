"""Shared fixtures: real COCO images, and torchvision reference models with seeded random weights
(benchmarks/reference.py explains how they are made)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.reference import torchvision_keypoint_reference, torchvision_reference  # noqa: E402,F401  (re-exported)

COCO_MINI = ROOT / "tests" / "assets" / "coco"


def coco_mini() -> Path:
    """The real COCO images and annotations committed with the tests (COCO layout; see its README.md)."""
    if not COCO_MINI.is_dir():
        pytest.fail(f"real test data not found at {COCO_MINI} (committed with the tests)")
    return COCO_MINI


def read_rgb(path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def tiny_model(**options):
    """A small random model whose class scores are scaled up so that it detects things quickly (with no
    pretrained weights offline, detections are arbitrary but deterministic). `options`: ModelConfig fields."""
    import maskrcnn

    torch.manual_seed(0)
    model = maskrcnn.build_model("resnet18_fpn", num_classes=4, min_size=128, max_size=192, fpn_channels=64,
                                 mask_head_channels=64, box_head_hidden=256,
                                 rpn=dict(pre_nms_top_n_test=200, post_nms_top_n_test=100), **options)
    with torch.no_grad():
        model.box_predictor.class_logits.weight.mul_(50)
    model.class_names = ["__background__", "cat", "dog", "bird"]
    model.category_ids = [0, 17, 18, 16]
    return model.eval()


@pytest.fixture(scope="session")
def val_images() -> list[Path]:
    return sorted((coco_mini() / "val2017").glob("*.jpg"))


@pytest.fixture
def one_thread():
    """Single-threaded math: fast on a busy 2-core machine and the same kernels in every process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
