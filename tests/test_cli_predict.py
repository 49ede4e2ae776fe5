"""`maskrcnn predict` end to end: overlays, predictions.json, maps, counts, video, bad inputs, torchrun."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import maskrcnn
from maskrcnn.cli import main
from conftest import tiny_model
from maskrcnn.commands._predict_inputs import InputItem, _output_files, assign_output_names, expand_inputs

# pycocotools' decode trips a numpy 2 deprecation inside its own code; nothing to fix on our side.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"file_name", "category_id", "category_name", "bbox", "score", "segmentation"}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A small random model that detects (arbitrary) things quickly (conftest.tiny_model)."""
    model = tiny_model()
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    maskrcnn.save_checkpoint(model, path)
    return path


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


def image_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.height, im.width


@pytest.fixture(scope="module")
def image_run(weights, val_images, tmp_path_factory):
    """One run over three real images (read in place), a copy of the first in another folder (same stem),
    and a corrupt jpg, with --semantic and --counts."""
    tmp = tmp_path_factory.mktemp("images")
    other = tmp / "other"
    other.mkdir()
    twin = other / val_images[0].name
    shutil.copy(val_images[0], twin)
    corrupt = tmp / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    inputs = [*val_images[:3], twin, corrupt]
    out = tmp / "out"
    # fp32: the torchrun test compares 1 process (2 threads) with 2 (1 thread each), which bf16 ("auto" on
    # CPUs with native bf16) rounds differently
    options = ["--weights", str(weights), "--device", "cpu", "--max-detections", "6", "--semantic", "--counts",
               "--no-progress", "--precision", "fp32"]
    status, stdout, stderr = run_cli("predict", *options, "--out", out, *inputs)
    predictions = json.loads((out / "predictions.json").read_text())
    return dict(status=status, stdout=stdout, stderr=stderr, out=out, inputs=inputs, twin=twin, corrupt=corrupt,
                predictions=predictions, options=options)


def test_corrupt_image_is_one_error_and_the_rest_are_written(image_run):
    assert image_run["status"] == 1
    error_lines = [line for line in image_run["stderr"].splitlines() if line.strip()]
    assert len(error_lines) == 1 and "corrupt.jpg" in error_lines[0] and "error" in error_lines[0]
    out = image_run["out"]
    stems = [p.stem for p in image_run["inputs"][:3]]
    for stem in stems:
        assert (out / f"{stem}.png").is_file()
    assert (out / f"other_{stems[0]}.png").is_file()  # same stem as the first input: no overwrite
    assert not (out / "corrupt.png").exists()
    assert not list(out.glob(".*"))  # no temporary or part files left behind


def test_predictions_json_is_coco_results(image_run):
    predictions = image_run["predictions"]
    inputs = [str(p) for p in image_run["inputs"]]
    assert predictions and all(set(e) == FIELDS for e in predictions)
    names_in_order = list(dict.fromkeys(e["file_name"] for e in predictions))
    assert names_in_order == [name for name in inputs[:4] if name in names_in_order]  # input order
    assert str(image_run["corrupt"]) not in names_in_order
    for entry in predictions:
        height, width = image_size(entry["file_name"])
        rle = dict(entry["segmentation"], counts=entry["segmentation"]["counts"].encode())
        mask = mask_utils.decode(rle)
        assert mask.shape == (height, width) and entry["segmentation"]["size"] == [height, width]
        x, y, w, h = entry["bbox"]
        assert w > 0 and h > 0 and 0 <= x and x + w <= width + 1 and y + h <= height + 1
        assert 0.5 <= entry["score"] <= 1.0 and entry["category_name"] in {"cat", "dog", "bird"}
        assert entry["category_id"] == {"cat": 17, "dog": 18, "bird": 16}[entry["category_name"]]
        ys, xs = np.nonzero(mask)
        if len(xs):  # the mask lies within its box (masks are pasted into the box)
            assert xs.min() >= x - 2 and xs.max() <= x + w + 2 and ys.min() >= y - 2 and ys.max() <= y + h + 2


def test_semantic_instance_maps_and_counts_agree(image_run):
    out, predictions = image_run["out"], image_run["predictions"]
    for path in image_run["inputs"][:3]:
        with Image.open(out / f"{path.stem}_semantic.png") as semantic:
            assert semantic.mode == "P" and (semantic.height, semantic.width) == image_size(path)
            classes = set(np.unique(np.asarray(semantic)).tolist())
        assert classes <= {0, 1, 2, 3}
        instances = np.asarray(Image.open(out / f"{path.stem}_instances.png"))
        assert instances.dtype in (np.uint16, np.int32) and instances.shape == image_size(path)
        assert instances.max() <= sum(e["file_name"] == str(path) for e in predictions)

    with open(out / "counts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"file_name", "class", "count"} <= set(rows[0])
    totals = Counter()
    for row in rows:
        if row["class"]:
            totals[row["class"]] += int(row["count"])
    assert totals == Counter(e["category_name"] for e in predictions)
    assert str(image_run["corrupt"]) not in {row["file_name"] for row in rows}
    for name, count in totals.items():  # the printed table
        assert any(line.split()[:2] == [name, str(count)] for line in image_run["stdout"].splitlines())


def make_clip(path: Path, frames: int = 6, size=(160, 120)) -> None:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, size)
    for k in range(frames):
        frame = np.full((size[1], size[0], 3), 40, np.uint8)
        cv2.rectangle(frame, (10 + 12 * k, 20), (60 + 12 * k, 80), (0, 200, 255), -1)
        cv2.circle(frame, (120 - 8 * k, 70), 22, (255, 80, 0), -1)
        writer.write(frame)
    writer.release()


def test_video_gets_an_overlay_video_and_frame_indexed_predictions(weights, tmp_path):
    import cv2

    clip = tmp_path / "clip.mp4"
    make_clip(clip)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 100)
    out = tmp_path / "out"
    status, _, stderr = run_cli("predict", "--weights", weights, "--out", out, "--device", "cpu",
                                "--max-detections", 3, "--score-thresh", 0.05, "--batch-size", 3, "--no-progress",
                                clip, broken)
    assert status == 1 and "broken.mp4" in stderr and len(stderr.strip().splitlines()) == 1
    capture = cv2.VideoCapture(str(out / "clip_overlay.mp4"))
    assert capture.isOpened()
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 6 and frames[0].shape == (120, 160, 3)
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(5.0)
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions and all(e["file_name"] == str(clip) for e in predictions)
    assert all(set(e) == FIELDS | {"frame"} for e in predictions)
    assert sorted({e["frame"] for e in predictions}) == list(range(6))
    assert [e["frame"] for e in predictions] == sorted(e["frame"] for e in predictions)
    assert mask_utils.decode(dict(predictions[0]["segmentation"],
                                  counts=predictions[0]["segmentation"]["counts"].encode())).shape == (120, 160)
    assert not (out / "broken_overlay.mp4").exists() and not list(out.glob(".*"))


def test_folders_globs_and_missing_inputs(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for name in ("b.png", "a.jpg", "c.JPEG", "notes.txt"):
        (folder / name).write_bytes(b"")
    (folder / "sub").mkdir()
    files, problems = expand_inputs([str(folder), str(folder / "*.png"), str(tmp_path / "nope.jpg"),
                                     str(tmp_path / "*.tif")])
    assert [p.name for p in files] == ["a.jpg", "b.png", "c.JPEG"]  # sorted; b.png found twice, kept once
    assert len(problems) == 2 and "nope.jpg" in problems[0] and "*.tif" in problems[1]

    items = [InputItem(i, Path(p), p.endswith(".mp4")) for i, p in
             enumerate(["a/x.jpg", "b/x.jpg", "a/x.png", "x_semantic.jpg", "v/x.mp4", "X.jpg"])]
    assign_output_names(items)
    names = [item.output_name for item in items]
    assert names[:3] == ["x", "b_x", "a_x"]
    files = [f.lower() for item in items for f in _output_files(item.output_name, item.is_video)]
    assert len(set(files)) == len(files)
    assert names[3] != "x_semantic" and names[4] == "x"  # x_overlay.mp4 collides with nothing


def test_no_usable_input_is_a_usage_error(weights, tmp_path):
    status, _, stderr = run_cli("predict", "--weights", weights, "--out", tmp_path / "o", tmp_path / "none.jpg")
    assert status == 2 and "none.jpg" in stderr


def test_torchrun_split_matches_single_process(image_run, weights, tmp_path):
    """The same inputs as `image_run` (four images and a corrupt file) over two processes: one merged
    predictions.json equal to the single-process one, and a failing exit status."""
    out = tmp_path / "multi"
    python_path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=python_path)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "maskrcnn.cli",
         "predict", *image_run["options"], "--out", str(out), *map(str, image_run["inputs"])],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "corrupt.jpg: cannot read image" in result.stderr, result.stderr[-3000:]
    single, multi = image_run["predictions"], json.loads((out / "predictions.json").read_text())
    assert [e["file_name"] for e in multi] == [e["file_name"] for e in single]  # same detections, input order
    for a, b in zip(single, multi):
        assert a["category_id"] == b["category_id"]
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=0.05)  # 1 vs 2 threads: float noise only
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        rles = [dict(e["segmentation"], counts=e["segmentation"]["counts"].encode()) for e in (a, b)]
        assert a["segmentation"] == b["segmentation"] or mask_utils.iou(rles[:1], rles[1:], [False])[0, 0] > 0.98
    assert (out / "counts.csv").read_text() == (image_run["out"] / "counts.csv").read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in image_run["out"].iterdir())
