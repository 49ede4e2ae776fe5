"""Synthetic videos of the shapes dataset's objects, with ground-truth identities, for testing trackers.

Objects (the same shapes, outlines and shading as `synthetic.py`) move in straight lines at constant speed
and spin slowly; some are there from the first frame, the others enter across the border later, and they
leave when they move out. Each has a fixed depth, so crossing objects occlude each other: an object is in
the ground truth of a frame while at least `MIN_VISIBLE_FRACTION` of it (and `MIN_VISIBLE_PIXELS`) is
visible, its mask and box being the visible part, as in the image dataset.

The ground truth is written in the format `maskrcnn predict` writes for videos (file_name, frame,
category_id, category_name, bbox, score 1.0, segmentation RLE) plus `track_id`, so it can be given to
`maskrcnn track --detections` as it is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .synthetic import (CLASS_NAMES, MIN_VISIBLE_FRACTION, MIN_VISIBLE_PIXELS, RING_HOLE_RATIO, _background,
                        _paint, _place, _polygon_area, _rasterize, _unit_outline)

MIN_OBJECTS, MAX_OBJECTS = 5, 9       # objects per video, over its whole length
DIAMETER_RANGE = (0.12, 0.3)          # relative to the shorter side
SPEED_RANGE = (0.006, 0.02)           # image sides per frame
MAX_SPIN = 0.03                       # radians per frame


@dataclass
class Mover:
    """One object of a video: where it is at frame t, and from which frame on it exists."""

    track_id: int
    label: int
    radius: float
    angle: float
    spin: float
    start: np.ndarray       # centre (x, y) at frame `first`
    velocity: np.ndarray    # pixels per frame
    first: int
    colour_seed: int

    def outlines(self, t: int) -> tuple[list[float], list[float] | None]:
        centre = self.start + self.velocity * (t - self.first)
        angle = self.angle + self.spin * (t - self.first)
        unit = _unit_outline(CLASS_NAMES[self.label - 1])
        outer = _place(unit, self.radius, angle, float(centre[0]), float(centre[1]))
        hole = None
        if CLASS_NAMES[self.label - 1] == "ring":
            hole = _place(unit, self.radius * RING_HOLE_RATIO, angle, float(centre[0]), float(centre[1]))
        return outer, hole


def plan_movers(rng: np.random.Generator, num_frames: int, height: int, width: int) -> list[Mover]:
    """The objects of one video: about half there from frame 0, the rest entering from a border later."""
    side = min(height, width)
    movers = []
    for track_id in range(1, int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1)) + 1):
        radius = side * rng.uniform(*DIAMETER_RANGE) / 2
        speed = side * rng.uniform(*SPEED_RANGE)
        target = np.array([rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height])
        if rng.random() < 0.5:
            first = 0
            start = np.array([rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)])
            direction = rng.uniform(0, 2 * math.pi)
            heading = np.array([math.cos(direction), math.sin(direction)])
        else:
            first = int(rng.integers(1, max(int(num_frames * 0.7), 2)))
            border = int(rng.integers(4))  # left, right, top, bottom: start just outside it
            along = rng.uniform(0.1, 0.9)
            start = [np.array([-radius, along * height]), np.array([width + radius, along * height]),
                     np.array([along * width, -radius]), np.array([along * width, height + radius])][border]
            heading = (target - start) / max(float(np.linalg.norm(target - start)), 1e-6)
        movers.append(Mover(track_id, int(rng.integers(len(CLASS_NAMES))) + 1, radius, rng.uniform(0, 2 * math.pi),
                            rng.uniform(-MAX_SPIN, MAX_SPIN), start, heading * speed, first,
                            int(rng.integers(2**31))))
    return movers


def frame_objects(movers: list[Mover], t: int, height: int, width: int) -> list[tuple[Mover, np.ndarray, float]]:
    """(mover, full mask, area) of the objects present at frame t, back to front (movers are in depth order)."""
    present = []
    for mover in movers:
        if t < mover.first:
            continue
        outer, hole = mover.outlines(t)
        full = _rasterize(outer, height, width)
        if hole is not None:
            full &= ~_rasterize(hole, height, width)
        present.append((mover, full, _polygon_area(outer) - (_polygon_area(hole) if hole else 0.0)))
    return present


def render_sequence(seed: int, num_frames: int, size: int, images: bool = True):
    """Yield (frame index, RGB uint8 image or None, ground truth) for each frame of the video `seed`;
    ground truth: [(track_id, label, visible mask (H, W) bool)] for the objects visible enough."""
    rng = np.random.default_rng([seed, 2])
    height, width = size, 2 * round(size * 2 / 3)  # 4:3, even (video codecs need even sizes)
    background = _background(rng, height, width) if images else None
    movers = plan_movers(rng, num_frames, height, width)
    for t in range(num_frames):
        present = frame_objects(movers, t, height, width)
        covered = np.zeros((height, width), dtype=bool)
        truth = []
        for mover, full, area in reversed(present):  # front to back: what is in front hides what is behind
            visible = full & ~covered
            covered |= full
            pixels = int(visible.sum())
            if pixels >= MIN_VISIBLE_PIXELS and pixels >= MIN_VISIBLE_FRACTION * area:
                truth.append((mover.track_id, mover.label, visible))
        truth.sort(key=lambda item: item[0])
        image = None
        if images:
            canvas = background.copy()
            for mover, full, _ in present:
                _paint(np.random.default_rng(mover.colour_seed), canvas, full)
            canvas += rng.normal(0.0, 4.0, size=canvas.shape).astype(np.float32)
            image = np.clip(canvas, 0, 255).round().astype(np.uint8)
        yield t, image, truth


def truth_boxes(truth) -> np.ndarray:
    """(N, 4) float32 x1 y1 x2 y2: the box of each ground-truth object's visible mask."""
    boxes = []
    for _, _, mask in truth:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def truth_entries(file_name: str, t: int, truth) -> list[dict]:
    """Ground truth of one frame in the predictions format, plus `track_id`."""
    from ..results import coco_results, encode_rle

    if not truth:
        return []
    rles = encode_rle(np.stack([mask for _, _, mask in truth]))
    labels = [label for _, label, _ in truth]
    entries = coco_results(truth_boxes(truth), labels, np.ones(len(truth)), rles,
                           fields={"file_name": file_name, "frame": t},
                           category_names=[CLASS_NAMES[label - 1] for label in labels])
    for entry, (track_id, _, _) in zip(entries, truth):
        entry["track_id"] = int(track_id)
    return entries


def make_shape_videos(out_dir: str | Path, num_videos: int = 3, num_frames: int = 100, size: int = 256,
                      seed: int = 0, progress: bool = True) -> list[dict]:
    """Write `video_NNN.mp4` and its ground truth `video_NNN_gt.json` for each video under out_dir; returns
    per video its paths and counts. Video i is a pure function of (seed, i, num_frames, size)."""
    from tqdm import tqdm

    from ..files import write_text_atomic
    from ..video import VideoWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(num_videos):
        video = out / f"video_{index:03d}.mp4"
        entries = []
        with VideoWriter(video, fps=25) as writer:
            for t, image, truth in tqdm(render_sequence(seed * 1000 + index, num_frames, size), total=num_frames,
                                        desc=video.name, disable=not progress, unit="frame"):
                writer.write(image)
                entries.extend(truth_entries(str(video), t, truth))
        truth_path = out / f"video_{index:03d}_gt.json"
        write_text_atomic(truth_path, json.dumps(entries))
        written.append({"video": str(video), "ground_truth": str(truth_path), "frames": num_frames,
                        "objects": len({e["track_id"] for e in entries}), "detections": len(entries)})
    return written
