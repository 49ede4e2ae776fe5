"""The overlay frame: tracked detections in their track's colour, untracked ones not drawn, trails drawn."""

from __future__ import annotations

import numpy as np

from maskrcnn.results import Detections
from maskrcnn.tracking.counting import LineCounter
from maskrcnn.tracking.outputs import draw_tracks, track_color
from maskrcnn.tracking.tracker import Track


def test_tracked_detections_take_their_track_colour_and_untracked_ones_are_not_drawn():
    masks = np.zeros((2, 120, 160), dtype=bool)
    masks[0, 40:80, 20:60] = True
    masks[1, 40:80, 100:140] = True
    detections = Detections([[20, 40, 60, 80], [100, 40, 140, 80]], [1, 1], [0.9, 0.8], masks, ["bg", "a"])
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    trail = Track(label=1, motion=None, first_frame=0, track_id=3)
    trail.trail.extend([(5.0, 20.0), (150.0, 20.0)])
    out = draw_tracks(image, detections, np.array([3, -1]), [trail], LineCounter(0, 0, 1, 1))
    tint = np.round(np.array(track_color(3)) * 0.45).astype(int)   # alpha 0.45 over black
    assert np.abs(out[60, 40].astype(int) - tint).max() <= 1
    assert (out[60, 120] == 0).all()                                 # the untracked detection: untouched
    line = out[18:23, 30:130].astype(int)                            # the trail (anti-aliased) along y = 20
    assert (np.abs(line - track_color(3)).max(axis=2) <= 40).any(axis=0).all()
    assert (image[18:23] == 0).all() and (out[95, 30:130] == 0).all()  # drawn on a copy, nowhere else
