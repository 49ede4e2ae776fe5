"""Line crossings by hand: direction, the segment's ends, a centre landing on the line."""

from __future__ import annotations

import pytest

from maskrcnn.tracking.counting import LineCounter, parse_line


def box_at(x: float, y: float):
    return [x - 5, y - 5, x + 5, y + 5]


def test_directions_and_segment_ends():
    counter = LineCounter(50, 100, 50, 0)  # drawn upwards: its left is the image's left
    assert counter.update(0, 1, "circle", box_at(40, 50)) is None
    assert counter.update(1, 1, "circle", box_at(60, 50)) == "left->right"
    assert counter.update(2, 1, "circle", box_at(45, 55)) == "right->left"   # back again: counted again
    counter.update(0, 2, "square", box_at(40, 150))
    assert counter.update(1, 2, "square", box_at(60, 150)) is None           # passes below the segment's end
    assert counter.totals() == {"circle": {"left->right": 1, "right->left": 1}}


def test_a_centre_on_the_line_counts_once_when_it_goes_on():
    counter = LineCounter(0, 0, 100, 0)  # horizontal, drawn rightwards: its left is above it (y < 0)
    for frame, y in enumerate([-10, 0, 0, 10, 20]):
        counter.update(frame, 7, "star", box_at(50, y))
    assert counter.totals() == {"star": {"left->right": 1, "right->left": 0}}
    assert counter.events == [{"frame": 3, "track_id": 7, "class": "star", "direction": "left->right"}]


@pytest.mark.parametrize("text", ["1,2,3", "1,2,3,x", "1,2,1,2", "nan,0,1,1"])
def test_bad_lines_are_refused(text):
    with pytest.raises(ValueError, match="x1,y1,x2,y2|two different points"):
        parse_line(text)
