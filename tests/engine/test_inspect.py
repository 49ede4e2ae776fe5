"""Stage panels: the staged run reproduces the model's own predictions, and every panel is written."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import maskrcnn
from maskrcnn.data.images import to_float_tensor
from maskrcnn.engine.stage_panels import stage_outputs, write_stage_panels


def small_model():
    torch.manual_seed(0)
    model = maskrcnn.build_model("resnet18_fpn", num_classes=4, min_size=128, max_size=192).eval()
    with torch.no_grad():
        model.box_predictor.class_logits.weight.mul_(50)
    return model


def test_stages_reproduce_predict():
    model = small_model()
    image = (np.random.default_rng(0).random((100, 140, 3)) * 255).astype(np.uint8)
    tensor = to_float_tensor(image)
    expected = model([tensor])[0]
    stages = stage_outputs(model, tensor)
    assert len(expected["boxes"]) > 0
    assert np.array_equal(stages["labels"], expected["labels"].numpy())
    assert np.allclose(stages["boxes"], expected["boxes"].numpy())
    assert stages["masks"].shape == (len(expected["boxes"]), 100, 140)
    # every final box was refined from one of the proposals, and proposals are a subset of the candidates
    assert len(stages["refined_from"]) == len(stages["boxes"])
    assert len(stages["proposals"]) <= len(stages["candidates"])
    assert stages["mask_probs"].shape[1:] == (28, 28)


def test_panels_written(tmp_path):
    image = (np.random.default_rng(1).random((90, 120, 3)) * 255).astype(np.uint8)
    paths = write_stage_panels(small_model(), image, tmp_path)
    assert [p.name for p in paths] == ["1_anchors.png", "2_proposals_before_nms.png", "3_proposals_after_nms.png",
                                       "4_box_refinement.png", "5_detections.png", "6_mask_probabilities.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.size[0] > 100 and im.size[1] > 50


def _outline_band(shape, boxes, width):
    """Pixels within `width` + 1 of some box's outline (clipped to the picture)."""
    height, wide = shape
    ys, xs = np.mgrid[0:height, 0:wide]
    band = np.zeros(shape, dtype=bool)
    reach = width + 1
    for x0, y0, x1, y1 in boxes:
        across = (xs >= x0 - reach) & (xs <= x1 + reach) & (ys >= y0 - reach) & (ys <= y1 + reach)
        near_edge = ((np.abs(xs - x0) <= reach) | (np.abs(xs - x1) <= reach) | (np.abs(ys - y0) <= reach)
                     | (np.abs(ys - y1) <= reach))
        band |= across & near_edge
    return band


def test_panels_draw_what_the_model_computes(tmp_path, monkeypatch):
    """Each panel shows the model's own boxes: the anchors are the model's anchors (all aspect ratios at 6 cells
    per level), the proposal panels draw the top 300 boxes by objectness and colour only their outlines, the
    refinement panel pairs every detection with its proposal, the detections panel tints every detected mask
    pixel, and the mask panel shows one 28x28 map per detection (up to 16)."""
    from maskrcnn.engine import stage_panels

    image = (np.random.default_rng(1).random((90, 120, 3)) * 255).astype(np.uint8)
    model = small_model()
    stages = stage_outputs(model, to_float_tensor(image))
    drawn, figures = [], []
    real_draw, real_save = stage_panels._draw_boxes, stage_panels._save

    def spy_draw(canvas, boxes, colors, width=1):
        out = real_draw(canvas, boxes, colors, width)
        drawn.append((canvas.copy(), np.array(boxes), list(colors), width, out))
        return out

    def spy_save(fig, path):
        figures.append((path.name, [(list(ax.patches), len(ax.images)) for ax in fig.axes]))
        return real_save(fig, path)

    monkeypatch.setattr(stage_panels, "_draw_boxes", spy_draw)
    monkeypatch.setattr(stage_panels, "_save", spy_save)
    paths = write_stage_panels(model, image, tmp_path)
    model_anchors = stages["anchors"]
    per_cell = model.rpn.anchor_generator.num_anchors_per_location
    assert len(drawn) == len(model_anchors) + 2
    for (_, boxes, _, _, _), anchors in zip(drawn, model_anchors):
        assert len(boxes) == min(6, len(anchors) // per_cell) * per_cell
        assert all((np.abs(anchors - box).max(axis=1) < 1e-4).any() for box in boxes)
    for (_, boxes, _, _, _), kind in zip(drawn[-2:], ("candidate", "proposal")):
        everything, scores = stages[kind + "s"], stages[kind + "_scores"]
        top = everything[np.argsort(-scores)[:300]]
        assert len(boxes) == len(top) > 0
        assert np.array_equal(np.unique(boxes, axis=0), np.unique(top, axis=0))
    for canvas, boxes, colors, width, out in drawn:
        changed = (out != canvas).any(axis=2)
        band = _outline_band(canvas.shape[:2], boxes, width)
        assert changed.any() == band.any()  # (the coarsest anchors can have all their edges off the picture)
        assert not (changed & ~band).any()
        last = _outline_band(canvas.shape[:2], boxes[-1:], width)  # drawn last, so on top: its colour shows
        assert (out[last] == colors[-1]).all(axis=1).any() == last.any()
    panels = dict(figures)
    n = len(stages["boxes"])
    (refinement, _), = panels["4_box_refinement.png"]
    solid = [p for p in refinement if p.get_linewidth() == 2]
    dashed = [p for p in refinement if p.get_linewidth() == 1 and p.get_linestyle() != "solid"]
    assert len(solid) == len(dashed) == min(30, n) > 0
    for patch, box in zip(solid, stages["boxes"]):
        assert np.allclose([*patch.get_xy(), patch.get_width(), patch.get_height()],
                           [box[0], box[1], box[2] - box[0], box[3] - box[1]])
    for patch, box in zip(dashed, stages["refined_from"]):
        assert np.allclose([*patch.get_xy(), patch.get_width(), patch.get_height()],
                           [box[0], box[1], box[2] - box[0], box[3] - box[1]])
    assert sum(images for _, images in panels["6_mask_probabilities.png"]) == min(16, n)
    # The detections panel is the model's detections as `draw_detections` (tested in test_viz) renders them,
    # and every detected-mask pixel is changed.
    from maskrcnn.viz import draw_detections

    with Image.open(paths[4]) as picture:
        detections = np.array(picture)
    inside = (stages["masks"] > 0.5).any(axis=0)
    assert inside.any()
    assert np.array_equal(detections, draw_detections(image, stages["boxes"], stages["labels"], stages["scores"],
                                                      stages["masks"] > 0.5, model.class_names))
    assert (detections != image).any(axis=2)[inside].all()
