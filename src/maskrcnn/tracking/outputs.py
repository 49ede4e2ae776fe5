"""What `maskrcnn track` writes for each video: tracks.json entries, a MOTChallenge CSV, the summary, and the
overlay frames (a stable colour and "#id class" tag per track, a short trail, the counting line)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

import numpy as np

from .counting import DIRECTIONS, LineCounter


@dataclass
class VideoTracks:
    """One video's tracked detections: per frame its entries (the input's or `Detections.to_coco`'s, one per
    detection), detections and track ids (-1: in no track)."""

    file_name: str
    output_name: str
    frames: list = field(default_factory=list)  # (frame index, entries, Detections, ids)
    counter: LineCounter | None = None

    def tracked_entries(self) -> list[dict]:
        """Every detection that belongs to a track, as its entry plus `track_id`, in frame order."""
        out = []
        for _, entries, _, ids in self.frames:
            out.extend({**entry, "track_id": int(track_id)} for entry, track_id in zip(entries, ids.tolist())
                       if track_id >= 0)
        return out

    def mot_rows(self) -> list[list]:
        """MOTChallenge rows: frame (from 1), id, left, top, width, height, score, -1, -1, -1."""
        rows = []
        for t, _, detections, ids in self.frames:
            for box, score, track_id in zip(detections.boxes.tolist(), detections.scores.tolist(), ids.tolist()):
                if track_id >= 0:
                    x1, y1, x2, y2 = box
                    rows.append([t + 1, track_id, round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2),
                                 round(score, 4), -1, -1, -1])
        return rows

    def summary(self) -> dict:
        """Unique objects per class, and each track's class, first and last frame, length (frames from first to
        last) and number of detections; the line crossings when counted."""
        tracks: dict[int, dict] = {}
        for t, _, detections, ids in self.frames:
            for name, track_id in zip(detections.names, ids.tolist()):
                if track_id < 0:
                    continue
                track = tracks.setdefault(track_id, {"track_id": track_id, "class": name, "first_frame": t,
                                                     "last_frame": t, "detections": 0})
                track["last_frame"] = t
                track["detections"] += 1
        for track in tracks.values():
            track["length"] = track["last_frame"] - track["first_frame"] + 1
        unique: dict[str, int] = {}
        for track in tracks.values():
            unique[track["class"]] = unique.get(track["class"], 0) + 1
        result = {"file_name": self.file_name, "frames": len(self.frames), "tracks": len(tracks),
                  "unique_objects": dict(sorted(unique.items())),
                  "track_list": [tracks[k] for k in sorted(tracks)]}
        if self.counter is not None:
            (x1, y1), (x2, y2) = self.counter.line
            result["count_line"] = [x1, y1, x2, y2]
            result["crossings"] = self.counter.totals()
            result["crossing_events"] = self.counter.events
        return result


def mot_csv(rows: list[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def summary_table(summary: dict) -> str:
    """The printed summary of one video: unique objects per class, and crossings when counted."""
    lines = [f"{summary['file_name']}: {summary['frames']} frames, {summary['tracks']} tracks"]
    for name, count in summary["unique_objects"].items():
        crossing = ""
        if "crossings" in summary:
            both = summary["crossings"].get(name, dict.fromkeys(DIRECTIONS, 0))
            crossing = "  crossings " + ", ".join(f"{d} {both[d]}" for d in DIRECTIONS)
        lines.append(f"  {name:<16} {count:>5} unique{crossing}")
    return "\n".join(lines)


def track_color(track_id: int) -> tuple[int, int, int]:
    """The colour of a track in every frame: the drawing palette at the track's id."""
    from ..viz import class_color

    return class_color(track_id)


def draw_tracks(image: np.ndarray, detections, ids: np.ndarray, active, counter: LineCounter | None) -> np.ndarray:
    """A frame with its tracked detections (masks and boxes in the track's colour, "#id class" tags), the last
    centres of each active track as a trail, and the counting line with its running totals."""
    import cv2

    from ..viz import draw_detections

    keep = np.flatnonzero(ids >= 0)
    picked = detections[keep]
    colors = [track_color(int(ids[i])) for i in keep]
    texts = [f"#{int(ids[i])} {name}" for i, name in zip(keep, picked.names)]
    out = draw_detections(image, picked.boxes, picked.labels, picked.scores, picked.mask_crops, picked.class_names,
                          show_legend=False, colors=colors if len(keep) else None, texts=texts)
    out = np.array(out)  # writable (PIL hands back a read-only array)
    thickness = max(1, round(max(out.shape[:2]) / 400))
    for track in active:
        points = np.round(np.asarray(track.trail, dtype=np.float64)).astype(np.int32)
        if len(points) >= 2:
            cv2.polylines(out, [points.reshape(-1, 1, 2)], False, track_color(track.track_id), thickness,
                          cv2.LINE_AA)
    if counter is not None:
        (x1, y1), (x2, y2) = counter.line
        cv2.line(out, (round(x1), round(y1)), (round(x2), round(y2)), (255, 255, 255), thickness + 1, cv2.LINE_AA)
        total = {d: sum(c for (_, dd), c in counter.counts.items() if dd == d) for d in DIRECTIONS}
        label = "  ".join(f"{d} {total[d]}" for d in DIRECTIONS)
        cv2.putText(out, label, (4, out.shape[0] - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return out
