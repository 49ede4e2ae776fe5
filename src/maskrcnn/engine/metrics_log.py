"""A run's log: RUN_DIR/metrics.jsonl (one JSON record per logged iteration or evaluation), the same scalars
in TensorBoard when it is installed, and curves.png drawn from metrics.jsonl at the end."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

from ..files import write_text_atomic


class MetricsLog:
    """Written by the main process only. On resume, the records after the checkpoint's iteration are dropped
    (those iterations are about to be redone); a fresh run starts an empty log."""

    def __init__(self, run_dir: Path, start_iter: int):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():
            if start_iter == 0:
                self.path.unlink()  # the previous run's log in its marked folder (run_folder.py)
            else:
                from .plots import read_metrics

                kept = [r for r in read_metrics(self.path) if r.get("iteration", 0) <= start_iter]
                write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.tensorboard = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is optional
            return
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_iter or None)

    def _append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def train(self, iteration: int, values: dict) -> None:
        """Losses, lr and timings of the iterations up to `iteration`."""
        record = {"type": "train", "iteration": iteration, **values}
        self._append(record)
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(f"train/{key}", value, iteration)

    def evaluation(self, iteration: int, summary: dict) -> None:
        """COCO metrics per task ({"bbox": {...}, "segm": {...}}) at `iteration`."""
        self._append({"type": "eval", "iteration": iteration, **summary})
        if self.tensorboard is not None:
            for task, values in summary.items():
                for key, value in values.items():
                    self.tensorboard.add_scalar(f"val/{task}_{key}", value, iteration)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def plot(self) -> None:
        """RUN_DIR/curves.png; a plotting problem only warns, it must not lose a finished run."""
        from .plots import plot_curves

        try:
            plot_curves(self.path, self.run_dir / "curves.png")
        except Exception as e:
            print(f"warning: could not draw {self.run_dir / 'curves.png'} ({e})", file=sys.stderr)
