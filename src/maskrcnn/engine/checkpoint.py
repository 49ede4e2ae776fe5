"""Training checkpoints: everything needed to continue a run exactly where it stopped.

Layout of RUN_DIR/last.pt (a plain dict, loadable with torch.load(weights_only=True), so reading one
never runs code):

    model          state dict
    config         ModelConfig as a dict      } what maskrcnn.load() needs to use the file as weights
    class_names    list[str]                  }
    category_ids   list[int]                  }
    optimizer      optimizer state dict (momentum buffers, learning rates)
    scheduler      LR scheduler state dict
    scaler         GradScaler state dict (fp16 AMP only) or None
    iteration      optimizer steps completed
    train_config   TrainConfig as a dict (the recipe this run follows)
    best_metric    best validation segm AP so far (or None), best_iteration
    format         "maskrcnn.train.v1"

Nothing else is needed for an exact resume: data order, augmentation and all sampling are pure
functions of (seed, epoch, index, iteration), see engine/seeds.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import MaskRCNNError, first_line
from ..files import atomic_path

TRAIN_FORMAT_TAG = "maskrcnn.train.v1"


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """Write to a temp file in the same folder, then rename: a crash mid-write never leaves a broken file."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_training_checkpoint(path: str | os.PathLike) -> dict:
    """Load last.pt for resuming, with a clear error when it is missing or not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise MaskRCNNError(f"{path}: no training checkpoint to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, wrong format, ...
        raise MaskRCNNError(f"{path}: cannot read training checkpoint ({first_line(e)})") from None
    if not isinstance(state, dict) or state.get("format") != TRAIN_FORMAT_TAG:
        raise MaskRCNNError(f"{path}: not a maskrcnn training checkpoint (cannot resume from it)")
    return state
