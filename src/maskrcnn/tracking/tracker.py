"""`Tracker`: identities across video frames, one frame's `Detections` at a time (so a file, a webcam or an
RTSP stream through OpenCV all work the same).

Each frame, ByteTrack's two stages, with Mask R-CNN's masks and classes in the similarity
(`association.similarity`) and a Kalman filter per track (`kalman.BoxMotion`):

1. every track's box is moved to where its motion model expects it (its last mask moved with it);
2. detections scoring >= `high_score` are matched to the confirmed tracks, lost ones included;
3. the detections scoring between `low_score` and `high_score` (partly hidden objects, motion blur) may
   continue the confirmed tracks still unmatched, at the stricter `low_min_similarity`; they never start a
   track. Unlike ByteTrack, lost tracks take part too: the class gate and the mask overlap make a low-score
   detection of the same object far more likely than one of a stranger, and an object that reappears after
   an occlusion often does so partly hidden, with a low score;
4. the same two stages for the tentative tracks (born in earlier frames, not confirmed yet) with the
   detections left over; then the high-score detections still left that score >= `new_track_score` start
   new tentative tracks;
5. a tentative track is confirmed, and gets its id, once matched in `min_hits` frames in a row (so one
   detection, whatever its score, never makes a track); a tentative track that misses a frame ends; a
   confirmed one survives `max_missed` frames without a match (occlusion) before it ends.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..checks import COUNT, NON_NEGATIVE_INT, PROBABILITY
from .association import assign, similarity
from .kalman import BoxMotion

TRAIL_LENGTH = 30  # centres kept per track for drawing


@dataclass
class Track:
    """One object followed over frames. `track_id` is None while the track is tentative."""

    label: int
    motion: BoxMotion
    first_frame: int
    track_id: int | None = None
    hits: int = 1
    missed: int = 0
    last_frame: int = 0
    score: float = 0.0
    box: np.ndarray = field(default_factory=lambda: np.zeros(4, dtype=np.float32))
    mask: tuple | None = None  # (crop, (row, column)) of the last matched detection
    seen_centre: np.ndarray = field(default_factory=lambda: np.zeros(2))
    pending: list = field(default_factory=list)  # (frame, detection index) matched while tentative
    trail: deque = field(default_factory=lambda: deque(maxlen=TRAIL_LENGTH))

    @property
    def confirmed(self) -> bool:
        return self.track_id is not None

    def predicted_mask(self) -> tuple | None:
        """The last mask moved by the motion since it was seen (whole pixels)."""
        if self.mask is None:
            return None
        centre = np.array([(self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2])
        dx, dy = np.round(centre - self.seen_centre).astype(np.int64).tolist()
        crop, (top, left) = self.mask
        return crop, (top + dy, left + dx)


class Tracker:
    """Track ids for each frame's detections: `ids = tracker.update(detections)` gives one id per detection
    (numpy int64, -1 for detections not in a confirmed track). Ids start at 1 and are never reused.

    After each `update`, `confirmed_now` lists the tracks confirmed in that frame as (track id, [(frame,
    detection index), ...]) for their detections of earlier frames (which `update` gave -1 then), so a caller
    holding the whole video can label those too; `active` are the confirmed tracks matched in that frame.
    """

    def __init__(self, high_score: float = 0.5, low_score: float = 0.1, new_track_score: float = 0.6,
                 min_similarity: float = 0.2, low_min_similarity: float = 0.4, mask_weight: float = 0.5,
                 min_hits: int = 2, max_missed: int = 10):
        for name, value in (("high_score", high_score), ("low_score", low_score),
                            ("new_track_score", new_track_score), ("min_similarity", min_similarity),
                            ("low_min_similarity", low_min_similarity), ("mask_weight", mask_weight)):
            PROBABILITY.check(name, value)
        COUNT.check("min_hits", min_hits)
        NON_NEGATIVE_INT.check("max_missed", max_missed)
        if not low_score <= high_score <= new_track_score:
            raise ValueError(f"expected low_score <= high_score <= new_track_score, got {low_score}, "
                             f"{high_score}, {new_track_score}")
        self.high_score, self.low_score, self.new_track_score = high_score, low_score, new_track_score
        self.min_similarity, self.low_min_similarity = min_similarity, low_min_similarity
        self.mask_weight, self.min_hits, self.max_missed = mask_weight, min_hits, max_missed
        self.tracks: list[Track] = []
        self.frame = -1
        self._next_id = 1
        self.confirmed_now: list[tuple[int, list[tuple[int, int]]]] = []
        self.active: list[Track] = []

    def update(self, detections) -> np.ndarray:
        """Take the next frame's `Detections`; returns the track id of each (-1: none)."""
        self.frame += 1
        self.confirmed_now, self.active = [], []
        ids = np.full(len(detections), -1, dtype=np.int64)
        for track in self.tracks:
            track.box = track.motion.predict()
        scores = detections.scores
        high = np.flatnonzero(scores >= self.high_score)
        low = np.flatnonzero((scores >= self.low_score) & (scores < self.high_score))
        confirmed = [t for t in self.tracks if t.confirmed]
        tentative = [t for t in self.tracks if not t.confirmed]

        matched, left_tracks, high = self._match(confirmed, detections, high, self.min_similarity)
        more, _, low = self._match(left_tracks, detections, low, self.low_min_similarity)
        matched += more
        more, left_tracks, high = self._match(tentative, detections, high, self.min_similarity)
        matched += more
        more, _, _ = self._match(left_tracks, detections, low, self.low_min_similarity)
        matched += more

        for track, index in matched:
            self._continue(track, detections, index)
        for index in high:
            if scores[index] >= self.new_track_score:
                track = self._start(detections, index)
                if track.confirmed:
                    matched.append((track, int(index)))
        self._end_unmatched({id(track) for track, _ in matched})
        for track, index in matched:
            if track.confirmed:
                ids[index] = track.track_id
                self.active.append(track)
        return ids

    def _match(self, tracks: list[Track], detections, candidates: np.ndarray, min_similarity: float):
        """Match `tracks` to the detections `candidates` (indices); returns [(track, detection index)], the
        unmatched tracks and the unmatched candidates."""
        if not tracks or len(candidates) == 0:
            return [], list(tracks), candidates
        crops, offsets = detections.mask_crops.crops, detections.mask_crops.offsets
        sim = similarity([t.box for t in tracks], [t.label for t in tracks], [t.predicted_mask() for t in tracks],
                         detections.boxes[candidates], detections.labels[candidates],
                         [(crops[j], offsets[j]) for j in candidates.tolist()], self.mask_weight)
        pairs, left_rows, left_cols = assign(sim, min_similarity)
        matches = [(tracks[i], int(candidates[j])) for i, j in pairs]
        return matches, [tracks[i] for i in left_rows], candidates[left_cols]

    def _observe(self, track: Track, detections, index: int) -> None:
        box = detections.boxes[index]
        track.score = float(detections.scores[index])
        track.last_frame = self.frame
        track.seen_centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2], dtype=np.float64)
        crop = detections.mask_crops.crops[index]
        track.mask = (crop, tuple(detections.mask_crops.offsets[index].tolist())) if crop.size else None
        track.trail.append(tuple(track.seen_centre.tolist()))

    def _continue(self, track: Track, detections, index: int) -> None:
        track.box = track.motion.update(detections.boxes[index])
        track.hits = track.hits + 1 if track.missed == 0 else 1
        track.missed = 0
        self._observe(track, detections, index)
        if not track.confirmed:
            track.pending.append((self.frame, index))
            if track.hits >= self.min_hits:
                track.track_id = self._next_id
                self._next_id += 1
                self.confirmed_now.append((track.track_id, track.pending[:-1]))
                track.pending = []

    def _start(self, detections, index: int) -> Track:
        track = Track(label=int(detections.labels[index]), motion=BoxMotion(detections.boxes[index]),
                      first_frame=self.frame, box=detections.boxes[index].copy())
        self._observe(track, detections, index)
        if self.min_hits == 1:  # confirmed at once: `update` reports this detection itself
            track.track_id = self._next_id
            self._next_id += 1
        else:
            track.pending.append((self.frame, index))
        self.tracks.append(track)
        return track

    def _end_unmatched(self, matched: set[int]) -> None:
        keep = []
        for track in self.tracks:
            if id(track) not in matched and track.first_frame != self.frame:
                track.missed += 1
                if not track.confirmed or track.missed > self.max_missed:
                    continue
            keep.append(track)
        self.tracks = keep
