"""Shared fixtures: real COCO images, and torchvision reference models with seeded random weights
(benchmarks/reference.py explains how they are made)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.reference import torchvision_reference  # noqa: E402,F401  (re-exported for the tests)

COCO_MINI = ROOT.parent / "shared" / "data" / "coco-mini"


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


@pytest.fixture(scope="session")
def val_images() -> list[Path]:
    return sorted((coco_mini() / "val2017").glob("*.jpg"))
