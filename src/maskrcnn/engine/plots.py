"""Training curves from RUN_DIR/metrics.jsonl as one PNG, so a run can be judged without TensorBoard."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..files import atomic_path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl file (a torn last line from a killed run is skipped)."""
    records = []
    path = Path(path)
    if not path.is_file():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def plot_curves(metrics_path: str | os.PathLike, out_path: str | os.PathLike) -> Path | None:
    """Loss curves (each loss and the total, log scale), learning rate, and validation AP over iterations.

    Returns the written path, or None when there is nothing to plot yet.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must happen before pyplot is imported
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if not train and not evals:
        return None

    fig, (ax_loss, ax_lr, ax_ap) = plt.subplots(1, 3, figsize=(16, 4.5))
    if train:
        iters = [r["iteration"] for r in train]
        names = [k for k in train[-1] if k.startswith("loss")]
        for name in names:
            values = [r.get(name, float("nan")) for r in train]
            ax_loss.plot(iters, values, label=name, linewidth=2.0 if name == "loss" else 1.0)
        ax_loss.set_yscale("log")
        ax_loss.legend(fontsize=8)
        ax_lr.plot(iters, [r.get("lr", float("nan")) for r in train])
    ax_loss.set_title("training losses")
    ax_loss.set_xlabel("iteration")
    ax_lr.set_title("learning rate")
    ax_lr.set_xlabel("iteration")
    if evals:
        iters = [r["iteration"] for r in evals]
        for task in ("bbox", "segm"):
            for key in ("AP", "AP50"):
                values = [r.get(task, {}).get(key, float("nan")) for r in evals]
                ax_ap.plot(iters, values, marker="o", label=f"{task} {key}")
        ax_ap.legend(fontsize=8)
    else:
        ax_ap.text(0.5, 0.5, "no validation set", ha="center", va="center", transform=ax_ap.transAxes)
    ax_ap.set_title("validation AP (COCO)")
    ax_ap.set_xlabel("iteration")
    for ax in (ax_loss, ax_lr, ax_ap):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    try:
        with atomic_path(out_path, keep_suffix=True) as tmp:  # savefig picks the format from the suffix
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return out_path
