"""Synthetic shape videos: reproducible, visible masks never overlap, objects enter, leave and occlude."""

from __future__ import annotations

import json

import numpy as np

from maskrcnn.data.synthetic_video import frame_objects, make_shape_videos, plan_movers, render_sequence


def test_same_seed_same_video_and_ground_truth(tmp_path):
    first = make_shape_videos(tmp_path / "a", num_videos=1, num_frames=6, size=64, seed=2, progress=False)[0]
    second = make_shape_videos(tmp_path / "b", num_videos=1, num_frames=6, size=64, seed=2, progress=False)[0]
    a, b = (json.loads(open(v["ground_truth"]).read()) for v in (first, second))
    assert [{**e, "file_name": ""} for e in a] == [{**e, "file_name": ""} for e in b] and a
    assert {e["frame"] for e in a} <= set(range(6)) and all(e["score"] == 1.0 and e["track_id"] >= 1 for e in a)


def test_visible_masks_are_disjoint_and_objects_come_and_go():
    frames = list(render_sequence(5, 80, 64, images=False))
    entered = left = occluded = False
    seen_first, seen_last = {}, {}
    for t, image, truth in frames:
        assert image is None
        if truth:
            stacked = np.stack([mask for _, _, mask in truth]).astype(int)
            assert stacked.sum(axis=0).max() <= 1  # each pixel shows at most one object
        for track_id, _, _ in truth:
            seen_first.setdefault(track_id, t)
            seen_last[track_id] = t
    entered = any(first > 0 for first in seen_first.values())
    left = any(last < 79 for last in seen_last.values())
    # occlusion: some object's full outline covers pixels of another's at some frame
    movers = plan_movers(np.random.default_rng([5, 2]), 80, 64, 86)
    for t in range(80):
        present = frame_objects(movers, t, 64, 86)
        occluded |= any((a & b).any() for i, (_, a, _) in enumerate(present) for _, b, _ in present[i + 1:])
    assert entered and left and occluded
