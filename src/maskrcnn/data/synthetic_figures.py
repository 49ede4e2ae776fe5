"""Stick-out "figures" for the synthetic keypoint dataset (`maskrcnn shapes --keypoints`).

A figure is a five-pointed, star-like polygon standing roughly upright (tilted up to 20 degrees): a head on
top, two hands at the sides, two feet below. Its five tips are its keypoints, named so that a horizontal flip
must swap them ("left_hand" is the hand on the image's left when the figure is upright), and the skeleton
joins them round the outline. Each figure's proportions vary (tip lengths and angles), so the keypoints are
learnt from the outline, not from a fixed template.

Visibility as in COCO: 2 where the figure shows within VISIBLE_RADIUS of the tip (its visible mask: a sharp
tip rasterizes thin), 1 where figures in front hide it there (labelled but hidden), 0 with x = y = 0 where
the tip lies outside the image.
"""

from __future__ import annotations

import math

import numpy as np

from maskrcnn.data.synthetic import _place, _polygon_area, _rasterize, _Shape

CATEGORY = "figure"
KEYPOINT_NAMES = ("head", "left_hand", "right_hand", "left_foot", "right_foot")
SKELETON = ((1, 2), (1, 3), (2, 4), (3, 5), (4, 5))  # 1-based, as COCO writes it
# Direction of each tip in image coordinates (y down, so -90 degrees is up), in KEYPOINT_NAMES order.
_TIP_DEGREES = (-90.0, 198.0, -18.0, 126.0, 54.0)
MIN_FIGURE_FRACTION, MAX_FIGURE_FRACTION = 0.25, 0.6  # figure diameter relative to the shorter image side
MAX_TILT_DEGREES = 20.0
MIN_FIGURES, MAX_FIGURES = 1, 4
VISIBLE_RADIUS = 2.5  # a tip is visible where its figure shows this close to it (tips rasterize thin)


def category() -> dict:
    """The COCO category of the figures, with their keypoints and skeleton."""
    return {"id": 1, "name": CATEGORY, "supercategory": "shape", "keypoints": list(KEYPOINT_NAMES),
            "skeleton": [list(edge) for edge in SKELETON]}


def random_figure(rng: np.random.Generator, height: int, width: int, size: int) -> _Shape:
    """One figure placed in a height x width image (label 1), with its tips as `points` (5, 2)."""
    diameter = size * rng.uniform(MIN_FIGURE_FRACTION, MAX_FIGURE_FRACTION)
    radius = diameter / 2
    center_x = rng.uniform(0.2 * radius, width - 0.2 * radius)
    center_y = rng.uniform(0.2 * radius, height - 0.2 * radius)
    tilt = math.radians(rng.uniform(-MAX_TILT_DEGREES, MAX_TILT_DEGREES))

    tips = np.radians(np.array(_TIP_DEGREES) + rng.uniform(-10, 10, 5))
    lengths = rng.uniform(0.75, 1.0, 5)
    tip_points = np.stack([lengths * np.cos(tips), lengths * np.sin(tips)], axis=1)
    # The outline goes round the tips in angle order, with an inner corner between neighbours.
    order = np.argsort(np.mod(tips, 2 * math.pi))
    inner = rng.uniform(0.4, 0.55)
    outline = []
    for position, tip in enumerate(order):
        following = order[(position + 1) % 5]
        outline.append(tip_points[tip])
        middle = _mid_angle(tips[tip], tips[following])
        outline.append([inner * math.cos(middle), inner * math.sin(middle)])
    outer = _place(np.array(outline), radius, tilt, center_x, center_y)
    full = _rasterize(outer, height, width)
    shape = _Shape(1, outer, None, full, _polygon_area(outer))
    # The tips as stored in the outline (rounded as the json has them), in KEYPOINT_NAMES order.
    corners = np.array(outer).reshape(-1, 2)[0::2]
    shape.points = corners[np.argsort(order)]
    return shape


def _mid_angle(first: float, second: float) -> float:
    """The angle halfway from `first` to `second` going the positive way round."""
    return first + np.mod(second - first, 2 * math.pi) / 2


def figure_keypoints(shapes: list[_Shape], index: int, height: int, width: int) -> list[float]:
    """COCO keypoints [x1, y1, v1, ...] of shapes[index], from its final visible mask."""
    shape = shapes[index]
    values: list[float] = []
    for x, y in shape.points:
        if not (0 <= x < width and 0 <= y < height):
            values += [0.0, 0.0, 0]
            continue
        values += [float(x), float(y), 2 if _shows_near(shape.visible, x, y) else 1]
    return values


def _shows_near(visible: np.ndarray, x: float, y: float) -> bool:
    """Whether a pixel of `visible` has its centre within VISIBLE_RADIUS of (x, y)."""
    top, left = max(0, int(y - VISIBLE_RADIUS)), max(0, int(x - VISIBLE_RADIUS))
    rows, cols = np.nonzero(visible[top:int(y + VISIBLE_RADIUS) + 1, left:int(x + VISIBLE_RADIUS) + 1])
    return bool(len(rows)) and float(np.hypot(cols + left + 0.5 - x, rows + top + 0.5 - y).min()) <= VISIBLE_RADIUS
