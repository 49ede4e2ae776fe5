"""Video tracking: identities across frames from Mask R-CNN's detections (masks, classes, scores, motion).

`Tracker` (tracker.py) takes one frame's `Detections` at a time; kalman.py is the motion model,
association.py the similarities and the assignment, counting.py the line crossings, outputs.py the files
`maskrcnn track` writes. Needs the `track` extra (scipy, filterpy).
"""

from .tracker import Track, Tracker

__all__ = ["Track", "Tracker"]
