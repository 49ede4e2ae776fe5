"""Training: `train(config)` runs what a TrainConfig says: SGD or AdamW with warm-up and decay, checkpoints you
can resume bit-exactly, validation with COCO AP, and the same code on one CPU or N processes under torchrun.

Where the parts live: config.py (TrainConfig, config files, "auto" settings), seeds.py (the random streams that
make runs reproducible), training_data.py, training_model.py (from scratch or fine-tuning), schedule.py (the
optimizer and lr schedule), trainer.py (the loop), metrics_log.py (metrics.jsonl, TensorBoard, curves.png),
run_folder.py (which folders a run may write into). The names below stay importable from here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import distributed
from .config import (LOSS_NAMES, TrainConfig, check_config, config_with, load_config_file, resolve_defaults,
                     setting_problems)
from .run_folder import check_run_folder
from .schedule import lr_factor, param_groups
from .seeds import derive_seed, sampling_generators
from .trainer import _Trainer, evaluate_model
from .training_data import training_transforms
from .training_model import CLASS_DEPENDENT_KEYS, build_training_model, merge_model_options


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True, _stop_after: int | None = None) -> dict:
    """Train as `config` says; returns a summary (iterations, last logged losses, validation metrics, paths).

    resume: continue from RUN_DIR/last.pt (the config should be the one the run started with). Without it,
    the run refuses a folder holding files it would replace that no earlier run wrote (run_folder.py).
    _stop_after (tests only): end the process's work after this many iterations, as if killed there.
    """
    check_config(config)
    check_run_folder(Path(config.out), resume)
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    info, device = distributed.setup(config.device)
    finished = False
    try:
        summary = _Trainer(resolve_defaults(config, device), info, device, resume, progress).run(_stop_after)
        finished = True
        return summary
    finally:
        distributed.cleanup(finished)
        torch.set_num_threads(threads_before)


__all__ = ["TrainConfig", "train", "config_with", "load_config_file", "build_training_model", "lr_factor",
           "evaluate_model", "resolve_defaults", "training_transforms", "LOSS_NAMES", "CLASS_DEPENDENT_KEYS",
           "setting_problems", "param_groups", "merge_model_options", "derive_seed", "sampling_generators"]
