"""Mask R-CNN instance segmentation: exact with torchvision checkpoints, one readable codebase."""

from .errors import MaskRCNNError
from .modeling.model import ARCHS, MaskRCNN, ModelConfig, build_model
from .predictor import Predictor
from .weights import load, save_checkpoint

__version__ = "0.1.0"
__all__ = ["ARCHS", "MaskRCNN", "MaskRCNNError", "ModelConfig", "Predictor", "Tracker", "build_model", "load", "save_checkpoint"]


def __getattr__(name):
    if name == "Tracker":  # imported on first use: it needs the `track` extra (scipy, filterpy)
        from .tracking import Tracker
        return Tracker
    raise AttributeError(f"module 'maskrcnn' has no attribute {name!r}")
