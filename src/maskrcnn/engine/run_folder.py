"""The run folder (TrainConfig.out): what a run writes there, and which folders a fresh run may write into.

A run marks its folder with MARKER when it starts. A fresh run (not --resume) replaces the outputs of the
run before it in the same folder, but refuses a folder that holds a file with one of the output names and
no marker: that file is someone else's (`--out .` next to the user's own config.yaml)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MaskRCNNError
from ..files import has_marker, mark_folder, write_text_atomic
from .config import TrainConfig

MARKER = ".maskrcnn-train"
# Everything a run writes into its folder (besides MARKER).
OUTPUT_NAMES = ("config.yaml", "metrics.jsonl", "last.pt", "model.safetensors", "best.safetensors", "curves.png",
                "tensorboard")


def check_run_folder(out: Path, resume: bool) -> None:
    """Refuse, before any work, a run folder whose files a fresh run would replace without being ours."""
    if os.path.lexists(out) and not out.is_dir():
        raise MaskRCNNError(f"{out}: the run folder (out) exists and is not a folder")
    if resume or not out.is_dir() or has_marker(out, MARKER):
        return
    found = [name for name in OUTPUT_NAMES if os.path.lexists(out / name)]
    if found:
        raise MaskRCNNError(f"{out}: holds {', '.join(found)} but is not a training run's folder (no {MARKER} "
                            f"file), and a fresh run would replace them; choose another out folder")


def start_run_folder(out: Path, config: TrainConfig) -> None:
    """Create and mark the run folder and record the run's settings in it (config.yaml)."""
    import yaml

    mark_folder(out, MARKER, "made by `maskrcnn train`; a fresh run with this --out replaces its outputs\n")
    write_text_atomic(out / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
