"""`maskrcnn track` end to end: the --detections path on a synthetic video's ground truth, the count line on
hand-made crossings, detect + track with a small model, and one-line answers to bad input."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections import Counter
from pathlib import Path

import cv2
import pytest

import maskrcnn
from maskrcnn.cli import main
from maskrcnn.data.synthetic_video import make_shape_videos
from tests.conftest import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FRAMES = 40


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


def video_frames(path) -> int:
    capture = cv2.VideoCapture(str(path))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> dict:
    return make_shape_videos(tmp_path_factory.mktemp("clip"), num_videos=1, num_frames=FRAMES, size=96, seed=4,
                             progress=False)[0]


def test_ground_truth_detections_give_one_track_per_object(clip, tmp_path):
    truth = json.loads(Path(clip["ground_truth"]).read_text())
    frames_of: dict[int, list[int]] = {}
    for entry in truth:
        frames_of.setdefault(entry["track_id"], []).append(entry["frame"])
    # the scenario: every object is seen in 2+ frames in a row, and no occlusion outlasts --max-missed (10)
    assert all(len(f) >= 2 and f[1] == f[0] + 1 and max(b - a for a, b in zip(f, f[1:])) <= 11
               for f in frames_of.values())
    code, out, err = run_cli("track", "--detections", clip["ground_truth"], "--out", tmp_path / "out")
    assert code == 0, err
    tracks = json.loads((tmp_path / "out" / "tracks.json").read_text())
    assert len(tracks) == len(truth)  # every ground-truth detection is in a track, with its fields kept
    assert [{k: v for k, v in e.items() if k != "track_id"} for e in tracks] == \
        [{k: v for k, v in e.items() if k != "track_id"} for e in truth]
    pairs = {(t["track_id"], e["track_id"]) for t, e in zip(tracks, truth)}
    assert len(pairs) == len(frames_of) == len({ours for _, ours in pairs})  # one id per object, none shared

    rows = list(csv.reader((tmp_path / "out" / "video_000_mot.csv").read_text().splitlines()))
    assert len(rows) == len(tracks)
    first = tracks[0]
    assert rows[0][:6] == [str(first["frame"] + 1), str(first["track_id"]),
                           *(str(round(v, 2)) for v in first["bbox"])]

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["videos"][0]
    classes = Counter({e["track_id"]: e["category_name"] for e in truth}.values())
    assert summary["unique_objects"] == dict(sorted(classes.items())) and summary["frames"] == FRAMES
    lengths = {t["track_id"]: (t["first_frame"], t["last_frame"], t["length"]) for t in summary["track_list"]}
    for ours, theirs in pairs:
        assert lengths[ours] == (frames_of[theirs][0], frames_of[theirs][-1],
                                 frames_of[theirs][-1] - frames_of[theirs][0] + 1)
    assert video_frames(tmp_path / "out" / "video_000_tracks.mp4") == FRAMES


def moving(file_name: str, name: str, category: int, start, step, frames: int = 10) -> list[dict]:
    return [{"file_name": file_name, "frame": t, "category_id": category, "category_name": name,
             "bbox": [start[0] + step[0] * t - 10, start[1] + step[1] * t - 10, 20, 20], "score": 0.9}
            for t in range(frames)]


def test_count_line_counts_crossings_per_class_and_direction(tmp_path):
    entries = (moving("street.mp4", "circle", 1, (20, 50), (6, 0)) + moving("street.mp4", "square", 2, (80, 30), (-6, 0))
               + moving("street.mp4", "star", 3, (20, 20), (0, 8)) + moving("street.mp4", "circle", 1, (20, 170), (6, 0)))
    path = tmp_path / "detections.json"
    path.write_text(json.dumps(entries))
    code, out, err = run_cli("track", "--detections", path, "--out", tmp_path / "out", "--count-line", "50,100,50,0")
    assert code == 0, err
    assert "no overlay for street.mp4" in out  # the video is not there: tracked without pictures
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["videos"][0]
    # the circle at y=50 goes right, the square left, the star never crosses, the circle at y=170 passes the end
    assert summary["crossings"] == {"circle": {"left->right": 1, "right->left": 0},
                                    "square": {"left->right": 0, "right->left": 1}}
    assert summary["unique_objects"] == {"circle": 2, "square": 1, "star": 1} and summary["tracks"] == 4
    assert not (tmp_path / "out" / "street_tracks.mp4").exists()


def test_detect_and_track_a_video(clip, tmp_path, one_thread):
    weights = tmp_path / "tiny.safetensors"
    maskrcnn.save_checkpoint(tiny_model(), weights)
    code, out, err = run_cli("track", clip["video"], "--weights", weights, "--out", tmp_path / "out", "--device",
                             "cpu", "--no-progress", "--score-thresh", "0.3", "--max-detections", "5")
    assert code == 0, err
    tracks = json.loads((tmp_path / "out" / "tracks.json").read_text())
    assert tracks and all(e["file_name"] == clip["video"] and 0 <= e["frame"] < FRAMES and e["track_id"] >= 1
                          and e["score"] >= 0.3 for e in tracks)
    assert len((tmp_path / "out" / "video_000_mot.csv").read_text().splitlines()) == len(tracks)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["videos"][0]
    assert summary["tracks"] == len({e["track_id"] for e in tracks})
    assert video_frames(tmp_path / "out" / "video_000_tracks.mp4") == FRAMES


@pytest.mark.parametrize("case, expected", [
    ("bad_video", "broken.mp4: cannot read video: OpenCV could not open it"),
    ("no_frame", "detections.json: entry 1 has no 'frame'"),
    ("not_a_list", "detections.json: expected a JSON list of detections"),
    ("bad_rle", "detections.json: entry 1: 'segmentation' must be a COCO RLE"),
    ("nothing", "give either VIDEO files (with --weights) or --detections FILE"),
    ("bad_line", "--count-line must be four numbers x1,y1,x2,y2"),
])
def test_bad_input_is_one_line(case, expected, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_text("not a video")
    detections = tmp_path / "detections.json"
    entry = {"file_name": "a.mp4", "frame": 0, "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.9}
    second = {k: v for k, v in entry.items() if k != "frame"}
    if case == "bad_rle":
        second = {**entry, "segmentation": {"size": [10, 10], "counts": 5}}
    detections.write_text(json.dumps([entry, second] if case != "not_a_list" else {"a": 1}))
    argv = {"bad_video": [broken, "--weights", "none.safetensors"], "no_frame": ["--detections", detections],
            "not_a_list": ["--detections", detections], "bad_rle": ["--detections", detections], "nothing": [],
            "bad_line": ["--detections", detections, "--count-line", "1,2,3"]}[case]
    code, out, err = run_cli("track", *argv, "--out", tmp_path / "out")
    assert code == 2 and out == "" and err.count("\n") == 1 and expected in err and err.startswith("maskrcnn track: ")
    assert not (tmp_path / "out").exists()
