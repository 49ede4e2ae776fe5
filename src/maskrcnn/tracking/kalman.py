"""The motion model of a track: a constant-velocity Kalman filter on the box centre and size (filterpy's
`KalmanFilter`), with noise proportional to the object's size, as in SORT / ByteTrack.

State: centre x, centre y, width, height and their velocities (pixels per frame); measurement: the box.
Big objects move (and are measured) with bigger errors in pixels than small ones, so the standard
deviations are fractions of the object's size, recomputed at every step.
"""

from __future__ import annotations

import numpy as np
from filterpy.kalman import KalmanFilter

# Standard deviations as fractions of the object's size (ByteTrack's values).
POSITION_NOISE = 1.0 / 20
VELOCITY_NOISE = 1.0 / 160
_MIN_SIZE = 1.0  # pixels: a box never shrinks below this in the model


def box_to_measurement(box) -> np.ndarray:
    """x1 y1 x2 y2 -> centre x, centre y, width, height."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, _MIN_SIZE), max(y2 - y1, _MIN_SIZE)])


def measurement_to_box(z) -> np.ndarray:
    """centre x, centre y, width, height -> x1 y1 x2 y2 (float32); sizes below a pixel are taken as a pixel."""
    cx, cy = float(z[0]), float(z[1])
    w, h = max(float(z[2]), _MIN_SIZE), max(float(z[3]), _MIN_SIZE)
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dtype=np.float32)


class BoxMotion:
    """One object's box, predicted one frame ahead (`predict`) and corrected by a detection (`update`)."""

    def __init__(self, box):
        z = box_to_measurement(box)
        kf = KalmanFilter(dim_x=8, dim_z=4)
        kf.F = np.eye(8)
        kf.F[:4, 4:] = np.eye(4)  # position += velocity each frame
        kf.H = np.eye(4, 8)
        kf.x = np.concatenate([z, np.zeros(4)])
        size = self._size(z)
        kf.P = np.diag(np.concatenate([np.full(4, 2 * POSITION_NOISE * size),
                                       np.full(4, 10 * VELOCITY_NOISE * size)]) ** 2)
        self._kf = kf

    @staticmethod
    def _size(z) -> float:
        return max((float(z[2]) + float(z[3])) / 2, _MIN_SIZE)

    def predict(self) -> np.ndarray:
        """Move one frame ahead; returns the predicted box (x1 y1 x2 y2)."""
        size = self._size(self._kf.x)
        self._kf.Q = np.diag(np.concatenate([np.full(4, POSITION_NOISE * size),
                                             np.full(4, VELOCITY_NOISE * size)]) ** 2)
        self._kf.predict()
        return self.box

    def update(self, box) -> np.ndarray:
        """Correct with a detected box; returns the corrected box."""
        z = box_to_measurement(box)
        self._kf.R = np.eye(4) * (POSITION_NOISE * self._size(z)) ** 2
        self._kf.update(z)
        return self.box

    @property
    def box(self) -> np.ndarray:
        return measurement_to_box(self._kf.x.reshape(-1)[:4])

    @property
    def velocity(self) -> np.ndarray:
        """Centre velocity (dx, dy) in pixels per frame."""
        x = self._kf.x.reshape(-1)
        return np.array([x[4], x[5]])
