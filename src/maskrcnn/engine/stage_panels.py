"""Pictures of every stage of Mask R-CNN for one image: what the anchors look like, what the RPN proposes
before and after NMS, how the box head moves proposals onto objects, and the raw 28x28 masks.

When training goes wrong these show where: no good proposals (RPN), good proposals but wrong classes or
boxes (box head), right boxes but blobby masks (mask head)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..modeling.fpn import pooled_levels
from ..modeling.plan import TORCHVISION
from ..modeling.transform import rescale_boxes
from ..viz import class_color, draw_detections, instance_colors, save_png, to_display_uint8


@torch.no_grad()
def stage_outputs(model, image: torch.Tensor) -> dict:
    """Run the model's stages one by one on one (3,H,W) image; boxes come back in input pixels."""
    model.eval()
    original = (int(image.shape[-2]), int(image.shape[-1]))
    batch, sizes, _ = model.transform([image])
    size = sizes[0]
    plan = TORCHVISION  # the fp32 model's arithmetic, whatever model.precision says
    features = model.features(batch, plan)
    rpn = model.rpn
    logits, deltas = rpn.head(features)
    anchors = rpn.anchor_generator(batch.shape[-2:], [f.shape[-2:] for f in features], batch.device)
    cand_boxes, cand_scores, levels = rpn.candidates(logits, deltas, anchors)
    proposals, proposal_scores = rpn.suppress(cand_boxes[0], cand_scores[0], levels, size)
    det = model.detect_boxes(pooled_levels(features), [proposals], sizes, plan)[0]
    det["mask_probs"] = model.predict_masks(pooled_levels(features), [det["boxes"]], [det["labels"]], sizes, plan)[0]
    final = model.to_input_pixels(det, size, original)

    def back(boxes: torch.Tensor) -> np.ndarray:
        return rescale_boxes(boxes, size, original).cpu().numpy()

    return {
        "anchors": [back(a) for a in anchors],
        "anchor_strides": [2 ** (level + 2) for level in range(len(features))],  # P2..P6
        "candidates": back(cand_boxes[0]), "candidate_scores": cand_scores[0].cpu().numpy(),
        "proposals": back(proposals), "proposal_scores": proposal_scores.cpu().numpy(),
        "refined_from": back(proposals[det["proposal_index"]]) if len(det["boxes"]) else np.zeros((0, 4)),
        "boxes": final["boxes"].cpu().numpy(), "labels": final["labels"].cpu().numpy(),
        "scores": final["scores"].cpu().numpy(), "masks": final["masks"][:, 0].cpu().numpy(),
        "mask_probs": det["mask_probs"].cpu().numpy(),
    }


def _draw_boxes(image: np.ndarray, boxes: np.ndarray, colors, width: int = 1) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    for box, color in zip(boxes, colors):
        draw.rectangle([float(v) for v in box], outline=tuple(int(c) for c in color), width=width)
    return np.asarray(canvas)


def _dim(image: np.ndarray) -> np.ndarray:
    return (image.astype(np.float32) * 0.55).astype(np.uint8)


def _score_colors(scores: np.ndarray) -> list[tuple[int, int, int]]:
    """Low objectness blue, high yellow (matplotlib's viridis)."""
    from matplotlib import colormaps

    rgba = colormaps["viridis"](np.clip(scores, 0, 1))
    return [tuple(int(255 * c) for c in row[:3]) for row in rgba]


def write_stage_panels(model, image: np.ndarray, out_dir: str | Path, *, max_boxes: int = 300,
                       max_refinements: int = 30, top_masks: int = 16, seed: int = 0) -> list[Path]:
    """Writes the stage PNGs into out_dir and returns their paths (in pipeline order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data.images import to_float_tensor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = to_display_uint8(image)
    device = next(model.parameters()).device
    stages = stage_outputs(model, to_float_tensor(image).to(device))
    per_cell = model.rpn.anchor_generator.num_anchors_per_location
    written = [_save(_anchor_panel(plt, stages, shown, per_cell, np.random.default_rng(seed)),
                     out / "1_anchors.png")]
    for name, boxes, scores, title in (
            ("2_proposals_before_nms.png", stages["candidates"], stages["candidate_scores"],
             "RPN candidates before NMS (top {n} of {total} by objectness)"),
            ("3_proposals_after_nms.png", stages["proposals"], stages["proposal_scores"],
             "RPN proposals after NMS (top {n} of {total})")):
        written.append(_save(_proposal_panel(plt, shown, boxes, scores, title, max_boxes), out / name))
    written.append(_save(_refinement_panel(plt, stages, shown, max_refinements), out / "4_box_refinement.png"))
    path = out / "5_detections.png"  # final detections with masks
    save_png(path, draw_detections(shown, stages["boxes"], stages["labels"], stages["scores"],
                                   stages["masks"] > 0.5, model.class_names))
    written.append(path)
    written.append(_save(_mask_panel(plt, stages, model, top_masks), out / "6_mask_probabilities.png"))
    return written


def _anchor_panel(plt, stages: dict, shown: np.ndarray, per_cell: int, rng: np.random.Generator):
    """1. anchors: at a handful of random cells per level, every aspect ratio."""
    levels = len(stages["anchors"])
    fig, axes = plt.subplots(1, levels, figsize=(4 * levels, 4.4))
    for ax, anchors, stride, name in zip(np.atleast_1d(axes), stages["anchors"], stages["anchor_strides"],
                                          [f"P{i + 2}" for i in range(levels)]):
        cells = len(anchors) // per_cell
        pick = rng.choice(cells, size=min(6, cells), replace=False)
        chosen = np.concatenate([anchors[c * per_cell:(c + 1) * per_cell] for c in pick])
        colors = [c for c in instance_colors(len(pick)) for _ in range(per_cell)]
        ax.imshow(_draw_boxes(_dim(shown), chosen, colors, width=2))
        ax.set_title(f"{name}: stride {stride}, {len(anchors)} anchors")
        ax.axis("off")
    fig.suptitle("Anchors (6 random positions per level, all aspect ratios)")
    return fig


def _proposal_panel(plt, shown: np.ndarray, boxes: np.ndarray, scores: np.ndarray, title: str, max_boxes: int):
    """2-3. proposals before and after NMS, coloured by objectness."""
    order = np.argsort(-scores)[:max_boxes][::-1]  # best drawn last, on top
    fig, ax = plt.subplots(figsize=(9, 9 * shown.shape[0] / shown.shape[1] + 0.6))
    ax.imshow(_draw_boxes(_dim(shown), boxes[order], _score_colors(scores[order])))
    ax.set_title(title.format(n=len(order), total=len(boxes)))
    ax.axis("off")
    return fig


def _refinement_panel(plt, stages: dict, shown: np.ndarray, max_refinements: int):
    """4. refinement: proposal (dashed) -> final box (solid) for the best detections."""
    fig, ax = plt.subplots(figsize=(9, 9 * shown.shape[0] / shown.shape[1] + 0.6))
    ax.imshow(_dim(shown))
    best = slice(0, max_refinements)
    for (px0, py0, px1, py1), (bx0, by0, bx1, by1), label in zip(stages["refined_from"][best],
                                                               stages["boxes"][best], stages["labels"][best]):
        color = np.array(class_color(int(label))) / 255
        ax.add_patch(plt.Rectangle((px0, py0), px1 - px0, py1 - py0, fill=False, ls="--", lw=1, ec=color))
        ax.add_patch(plt.Rectangle((bx0, by0), bx1 - bx0, by1 - by0, fill=False, lw=2, ec=color))
        ax.annotate("", xy=((bx0 + bx1) / 2, (by0 + by1) / 2), xytext=((px0 + px1) / 2, (py0 + py1) / 2),
                    arrowprops=dict(arrowstyle="->", color=color, lw=1))
    shown_n = min(max_refinements, len(stages["boxes"]))
    ax.set_title(f"Box head: proposal (dashed) -> final box (solid), best {shown_n} of {len(stages['boxes'])}")
    ax.axis("off")
    return fig


def _mask_panel(plt, stages: dict, model, top_masks: int):
    """6. raw 28x28 mask probabilities of the best detections."""
    n = min(top_masks, len(stages["mask_probs"]))
    cols = max(1, min(4, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if k < n:
            ax.imshow(stages["mask_probs"][k], vmin=0, vmax=1, cmap="magma")
            ax.set_title(f"{model.class_names[int(stages['labels'][k])]} {stages['scores'][k]:.2f}", fontsize=9)
    fig.suptitle(f"Mask head output: {model.mask_predictor.logits.out_channels}-class masks, "
                 f"the detected class's 28x28 probabilities" if n else "No detections")
    return fig


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
