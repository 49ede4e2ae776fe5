"""The tracker's parts with hand-computed expectations: the Kalman filter, the similarities, the assignment and
ByteTrack's two-stage logic (occlusion, low-score detections, class changes)."""

from __future__ import annotations

import numpy as np
import pytest

from maskrcnn.results import Detections
from maskrcnn.tracking.association import assign, box_iou, crop_iou, similarity
from maskrcnn.tracking.kalman import BoxMotion
from maskrcnn.tracking.tracker import Tracker

SIZE = (120, 240)


def frame(*objects) -> Detections:
    """Detections of one frame: each object (x1, y1, x2, y2, label, score), its mask the filled box."""
    masks = np.zeros((len(objects), *SIZE), dtype=bool)
    for mask, (x1, y1, x2, y2, _, _) in zip(masks, objects):
        mask[y1:y2, x1:x2] = True
    return Detections(boxes=[o[:4] for o in objects], labels=[o[4] for o in objects],
                      scores=[o[5] for o in objects], masks=masks, class_names=["__background__", "a", "b"],
                      image_size=SIZE)


def run(tracker: Tracker, frames) -> list[list[int]]:
    return [tracker.update(f).tolist() for f in frames]


# ---------------------------------------------------------------------------------------------- parts

def test_kalman_learns_a_constant_velocity():
    motion = BoxMotion([0, 10, 20, 30])
    for t in range(1, 31):
        motion.predict()
        motion.update([3 * t, 10, 3 * t + 20, 30])
    assert motion.velocity == pytest.approx([3.0, 0.0], abs=0.1)
    # three frames ahead with no measurement: the box keeps moving 3 px per frame, size unchanged
    for _ in range(3):
        box = motion.predict()
    assert box == pytest.approx([99, 10, 119, 30], abs=0.5)


def test_box_iou_by_hand():
    iou = box_iou([[0, 0, 10, 10], [0, 0, 2, 2]], [[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    expected = [[50 / 150, 0, 1], [0, 0, 4 / 100]]
    assert iou == pytest.approx(np.array(expected))


def test_crop_iou_counts_only_the_window_overlap():
    a = np.ones((4, 4), dtype=bool)         # rows 10..13, columns 20..23: 16 pixels
    b = np.zeros((4, 6), dtype=bool)
    b[:, :2] = True                          # rows 12..15, columns 22..27, only its 2 left columns: 8 pixels
    inter = 2 * 2                            # rows 12..13, columns 22..23
    assert crop_iou(a, (10, 20), b, (12, 22)) == pytest.approx(inter / (16 + 8 - inter))
    assert crop_iou(a, (10, 20), b, (30, 30)) == 0.0
    assert crop_iou(a, (-2, -2), a, (0, 0)) == pytest.approx(4 / 28)  # offsets off the image are fine


def test_similarity_mixes_mask_and_box_iou_and_never_crosses_classes():
    full = np.ones((10, 10), dtype=bool)
    ring = full.copy()
    ring[2:8, 2:8] = False                   # 64 pixels, all inside the full square's 100
    boxes = [[0, 0, 10, 10]]
    sim = similarity(boxes, [1], [(full, (0, 0))], boxes * 3, [1, 2, 1],
                     [(ring, (0, 0)), (full, (0, 0)), None], mask_weight=0.5)
    # same box: box IoU 1; masks: 64 / 100; the other class: 0; no mask: the box IoU alone
    assert sim == pytest.approx(np.array([[0.5 * 0.64 + 0.5, 0.0, 1.0]]))


def test_assignment_is_optimal_not_greedy_and_respects_the_threshold():
    sim = np.array([[0.9, 0.8], [0.85, 0.1]])
    matches, rows, cols = assign(sim, 0.5)
    assert matches == [(0, 1), (1, 0)] and rows == [] and cols == []  # 1.65 beats the greedy 0.9 (+0.1 refused)
    matches, rows, cols = assign(np.array([[0.3, 0.9], [0.2, 0.1], [0.1, 0.0]]), 0.5)
    assert matches == [(0, 1)] and rows == [1, 2] and cols == [0]
    assert assign(np.zeros((0, 3)), 0.5) == ([], [], [0, 1, 2])


# ---------------------------------------------------------------------------------------------- tracker

def test_crossing_objects_keep_their_ids_through_a_three_frame_occlusion():
    """A moves right, B left, same class and row; while they overlap (frames 16-18) only A, in front, is
    detected. Afterwards each detection must still carry its own object's id."""
    frames, truth = [], []
    for t in range(32):
        a, b = 10 + 4 * t, 200 - 4 * t
        objects = [(a, 40, a + 20, 60, 1, 0.9)]
        owners = ["A"]
        if t not in (21, 22, 23):
            objects.append((b, 40, b + 20, 60, 1, 0.9))
            owners.append("B")
        frames.append(frame(*objects))
        truth.append(owners)
    assert 10 + 4 * 22 - (200 - 4 * 22) in range(-20, 20)  # they do overlap while B is hidden
    ids = run(Tracker(), frames)
    seen = {owner: {i for owners, row in zip(truth, ids) for o, i in zip(owners, row) if o == owner}
            for owner in "AB"}
    # frame 0 is tentative (-1: min_hits 2); from frame 1 on each object has exactly one id
    assert ids[0] == [-1, -1]
    assert len(seen["A"] - {-1}) == 1 and len(seen["B"] - {-1}) == 1 and seen["A"] != seen["B"]
    assert all(-1 not in row for row in ids[1:])


def test_a_single_detection_never_starts_a_track():
    tracker = Tracker()
    lone_low = [frame((30, 30, 50, 50, 1, 0.3)) for _ in range(5)]  # low score, however long it stays
    assert run(tracker, lone_low) == [[-1]] * 5 and tracker.tracks == []
    # one high-score detection alone is a tentative track that ends when it is not seen again
    ids = run(tracker, [frame((30, 30, 50, 50, 1, 0.9)), frame(), frame((100, 30, 120, 50, 1, 0.9))])
    assert ids == [[-1], [], [-1]] and all(not t.confirmed for t in tracker.tracks)


def test_the_first_detection_of_a_track_is_reported_once_it_is_confirmed():
    tracker = Tracker(min_hits=3)
    for t in range(3):
        ids = tracker.update(frame((30 + t, 30, 50 + t, 50, 1, 0.9)))
    assert ids.tolist() == [1] and tracker.confirmed_now == [(1, [(0, 0), (1, 0)])]


def test_a_class_change_never_continues_a_track():
    frames = [frame((30, 30, 50, 50, 1, 0.9)) for _ in range(3)] + [frame((30, 30, 50, 50, 2, 0.9))] * 3
    ids = run(Tracker(), frames)
    assert ids == [[-1], [1], [1], [-1], [2], [2]]


def test_low_score_detections_continue_a_track_in_the_second_stage():
    scores = [0.9, 0.9, 0.3, 0.2, 0.9]
    frames = [frame((30 + 2 * t, 30, 50 + 2 * t, 50, 1, s)) for t, s in enumerate(scores)]
    assert run(Tracker(), frames) == [[-1], [1], [1], [1], [1]]
    # below low_score they are ignored: the track misses those frames but survives them
    assert run(Tracker(low_score=0.25), frames) == [[-1], [1], [1], [-1], [1]]


@pytest.mark.parametrize("gap, same", [(4, True), (5, False)])
def test_a_track_survives_max_missed_frames(gap, same):
    frames = [frame((30 + t, 30, 50 + t, 50, 1, 0.9)) for t in range(3)] + [frame()] * gap
    frames += [frame((33 + gap + t, 30, 53 + gap + t, 50, 1, 0.9)) for t in range(2)]
    ids = run(Tracker(max_missed=4), frames)
    assert ids[1] == ids[2] == [1]
    assert ids[-1] == ([1] if same else [2])


def test_mask_overlap_tells_apart_objects_whose_boxes_agree():
    """Two same-class objects share one box (an L and its complement); the masks decide who is who."""
    size = (120, 240)
    left = np.zeros((2, *size), dtype=bool)
    left[0, 20:60, 20:40] = True              # the left half of the box
    left[1, 20:60, 40:60] = True              # the right half
    boxes = [[20, 20, 60, 60], [20, 20, 60, 60]]

    def halves(order, scores=(0.9, 0.8)):
        return Detections(boxes=boxes, labels=[1, 1], scores=list(scores), masks=left[list(order)],
                          class_names=["__background__", "a"], image_size=size)

    tracker = Tracker()
    first = [tracker.update(halves([0, 1])) for _ in range(3)][-1]
    swapped = tracker.update(halves([1, 0]))   # the detections come in the other order
    assert first.tolist() == [1, 2] and swapped.tolist() == [2, 1]
    boxes_only = Tracker(mask_weight=0.0)
    [boxes_only.update(halves([0, 1])) for _ in range(3)]
    assert boxes_only.update(halves([1, 0])).tolist() == [1, 2]  # boxes alone cannot see the swap


def test_a_low_score_detection_brings_back_a_lost_track_of_its_class_only():
    """After a missed frame the object comes back partly hidden (score 0.3): it continues its track; a
    low-score detection of another class at the same place continues nothing."""
    seen = [frame((30 + 2 * t, 30, 50 + 2 * t, 50, 1, 0.9)) for t in range(3)]
    back = frame((38, 30, 58, 50, 1, 0.3), (38, 30, 58, 50, 2, 0.3))
    assert run(Tracker(), seen + [frame(), back]) == [[-1], [1], [1], [], [1, -1]]
