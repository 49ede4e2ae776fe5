"""The tracking benchmark's TrackEval wiring, on a hand-made id swap (trackeval is in the `test` extra)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.tracking import score, trackeval_data


def test_an_id_swap_scores_as_computed_by_hand():
    a, b = [0, 0, 10, 10], [50, 50, 60, 60]
    truth = [(np.array([1, 2]), np.array([a, b], dtype=np.float32))] * 4
    # the tracker follows both objects but swaps their ids from frame 2 on
    tracked = [(np.array([10, 20]), np.array([a, b], dtype=np.float32))] * 2 + \
              [(np.array([20, 10]), np.array([a, b], dtype=np.float32))] * 2
    result = score([trackeval_data(truth, tracked)])
    # CLEAR: each object changes id once; MOTA = 1 - (0 misses + 0 false positives + 2 switches) / 8
    assert result["IDSW"] == 2 and result["MOTA"] == pytest.approx(0.75)
    # Identity: each ground-truth id matches one tracker id for 2 of its 4 frames: IDF1 = 2*4 / (2*4 + 4 + 4)
    assert result["IDF1"] == pytest.approx(0.5)
    perfect = score([trackeval_data(truth, [(np.array([10, 20]), np.array([a, b], dtype=np.float32))] * 4)])
    assert perfect["IDF1"] == perfect["MOTA"] == pytest.approx(1.0) and perfect["IDSW"] == 0
