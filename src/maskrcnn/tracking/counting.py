"""Counting tracks that cross a line segment, per class and direction.

A track crosses when the centre of its box moves from one side of the line to the other between two
consecutive observations (frames it was missed in are stepped over) and that move passes through the
segment itself, not its extension. Direction: "left->right" when the centre goes from the left of the
segment (seen from its first point looking towards its second, in image coordinates with y down) to its
right, "right->left" the other way. Each track is counted once per crossing, so one going back and forth
counts each time.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

DIRECTIONS = ("left->right", "right->left")


def _side(line, point) -> float:
    """> 0 right of the line, < 0 left (image coordinates: y points down), 0 on it."""
    (x1, y1), (x2, y2) = line
    return (x2 - x1) * (point[1] - y1) - (y2 - y1) * (point[0] - x1)


def _crosses_segment(line, start, end) -> bool:
    """Whether the move start -> end passes between the segment's two ends."""
    a, b = line
    return (_side((start, end), a) > 0) != (_side((start, end), b) > 0)


class LineCounter:
    """Crossings of the segment (x1, y1) -> (x2, y2) by tracks, counted as `update` sees them."""

    def __init__(self, x1: float, y1: float, x2: float, y2: float):
        if (x1, y1) == (x2, y2):
            raise ValueError("the counting line needs two different points")
        self.line = ((float(x1), float(y1)), (float(x2), float(y2)))
        self.counts: Counter = Counter()  # (class name, direction) -> crossings
        self.events: list[dict] = []
        self._last: dict[int, tuple[float, float]] = {}

    def update(self, frame: int, track_id: int, class_name: str, box) -> str | None:
        """Track `track_id` seen at `box` (x1 y1 x2 y2) in `frame`: returns the direction when this move crossed
        the line, else None."""
        box = np.asarray(box, dtype=np.float64)
        centre = (float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2)
        after = _side(self.line, centre)
        if after == 0:
            return None  # on the line: the move is judged from the last point off it to the next one
        previous = self._last.get(track_id)
        self._last[track_id] = centre
        if previous is None:
            return None
        before = _side(self.line, previous)
        if (before > 0) == (after > 0) or not _crosses_segment(self.line, previous, centre):
            return None
        direction = DIRECTIONS[0] if before < 0 else DIRECTIONS[1]
        self.counts[(class_name, direction)] += 1
        self.events.append({"frame": int(frame), "track_id": int(track_id), "class": class_name,
                            "direction": direction})
        return direction

    def totals(self) -> dict[str, dict[str, int]]:
        """{class name: {direction: crossings}}, classes sorted by name, both directions always present."""
        classes = sorted({name for name, _ in self.counts})
        return {name: {d: int(self.counts[(name, d)]) for d in DIRECTIONS} for name in classes}


def parse_line(text: str) -> tuple[float, float, float, float]:
    """`--count-line x1,y1,x2,y2` -> four numbers; ValueError with the reason otherwise."""
    parts = text.split(",")
    if len(parts) != 4:
        raise ValueError(f"must be four numbers x1,y1,x2,y2, got {text!r}")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"must be four numbers x1,y1,x2,y2, got {text!r}") from None
    if not all(np.isfinite(values)):
        raise ValueError(f"must be four finite numbers x1,y1,x2,y2, got {text!r}")
    if values[:2] == values[2:]:
        raise ValueError(f"needs two different points, got {text!r}")
    return values
