"""What a run trains and validates on: the training set with its augmentation and its aspect-ratio grouped
batches, the validation set, and the one-line message of an error raised in a DataLoader worker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import MaskRCNNError
from .config import TrainConfig
from .seeds import _AUGMENT, _DATA_ORDER, derive_seed


@dataclass
class TrainingData:
    dataset: object                 # CocoDataset with the training transforms
    batches: object                 # AspectRatioGroupedBatches: the global batches of each epoch
    iters_per_epoch: int
    total_iters: int
    val_dataset: object | None      # only on the main process, which alone validates


def open_training_data(c: TrainConfig, main: bool) -> TrainingData:
    """Open and check the training set (and on the main process the validation set) of config `c`."""
    from ..data.augment import AspectRatioGroupedBatches

    dataset = open_dataset(c.train_annotations, c.train_images, "training", skip_invalid=c.skip_invalid,
                           augment_seed=derive_seed(c.seed, _AUGMENT))
    try:  # flips swap left/right keypoints, by the names of the dataset's keypoints
        dataset.transforms = training_transforms(c, dataset.keypoint_names)
    except ValueError as e:
        raise MaskRCNNError(f"{c.train_annotations}: {e}") from None
    if len(dataset) == 0:
        raise MaskRCNNError(f"{c.train_annotations}: the training set has no images")
    skipped = sum(dataset.skipped.values())  # crowd regions, degenerate boxes, empty masks
    if len(dataset.coco.anns) - skipped <= 0:
        raise MaskRCNNError(f"{c.train_annotations}: the training set has no usable (non-crowd) instances")
    try:
        batches = AspectRatioGroupedBatches(dataset.aspect_ratios, c.batch_size, derive_seed(c.seed, _DATA_ORDER))
    except ValueError as e:
        raise MaskRCNNError(f"{c.train_annotations}: too few images for batch size {c.batch_size} ({e})") from None
    iters_per_epoch = len(batches)
    total_iters = c.iters if c.iters is not None else c.epochs * iters_per_epoch
    val_dataset = None
    if c.val_annotations and main:
        val_dataset = open_dataset(c.val_annotations, c.val_images, "validation", skip_invalid=c.skip_invalid)
        if val_dataset.category_ids != dataset.category_ids:
            raise MaskRCNNError(f"{c.val_annotations}: categories differ from the training set's "
                                f"({c.train_annotations})")
        if val_dataset.keypoint_names != dataset.keypoint_names:
            raise MaskRCNNError(f"{c.val_annotations}: keypoints differ from the training set's "
                                f"({c.train_annotations})")
    return TrainingData(dataset, batches, iters_per_epoch, total_iters, val_dataset)


def training_transforms(config: TrainConfig, keypoint_names=()):
    """The augmentation of `config`; `keypoint_names` (the dataset's) tell flips which keypoints swap."""
    from ..data.augment import Compose, LargeScaleJitter, RandomHorizontalFlip, ResizeShortestSide

    steps = []
    if config.flip:
        steps.append(RandomHorizontalFlip(0.5, keypoint_names=keypoint_names))
    if config.lsj:
        steps.append(LargeScaleJitter(config.lsj, tuple(config.lsj_scale)))
    else:
        steps.append(ResizeShortestSide(tuple(config.min_sizes), config.max_size))
    return Compose(steps)


def open_dataset(annotations: str, images: str, what: str, **kwargs):
    from ..data.coco import CocoDataset

    if not annotations or not images:
        raise MaskRCNNError(f"{what} set needs both an annotation file and an image folder")
    if not Path(images).is_dir():
        raise MaskRCNNError(f"{images}: {what} image folder not found")
    return CocoDataset(annotations, images, **kwargs)  # every image file checked as it opens (data/validate.py)


def worker_error_message(error: Exception) -> str:
    """DataLoader workers re-raise with the whole traceback in the message; keep the user-facing line."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if last.startswith(("maskrcnn.errors.MaskRCNNError", "MaskRCNNError")) else last
    return text
