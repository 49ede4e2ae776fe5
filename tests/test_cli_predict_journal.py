"""`maskrcnn predict` loses nothing on a crash: the predictions.jsonl journal, --resume, atomic outputs,
a full disk, and single images that are too large or run out of memory."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn import journal
from maskrcnn.predictor import Predictor
from test_cli_predict import ROOT, run_cli, weights  # noqa: F401  (weights is a fixture)

N_IMAGES = 5


@pytest.fixture(scope="module")
def small_images(val_images, tmp_path_factory) -> list[Path]:
    """Real photos, shrunk so that a run is quick."""
    folder = tmp_path_factory.mktemp("small")
    paths = []
    for k in range(N_IMAGES):
        with Image.open(val_images[k]) as im:
            im.convert("RGB").resize((160, 120), Image.BILINEAR).save(folder / f"img{k}.png")
        paths.append(folder / f"img{k}.png")
    return paths


def options(weights, out, *extra):
    return ["predict", "--weights", weights, "--device", "cpu", "--max-detections", 4, "--score-thresh", 0.3,
            "--no-progress", "--out", out, *extra]


@pytest.fixture(scope="module")
def reference(weights, small_images, tmp_path_factory):
    """An uninterrupted run over the small images: what every resumed run must reproduce."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the OMP_NUM_THREADS=1 subprocess below
    try:
        out = tmp_path_factory.mktemp("reference")
        status, _, stderr = run_cli(*options(weights, out, "--semantic"), *small_images)
    finally:
        torch.set_num_threads(before)
    assert status == 0, stderr
    return out


def count_model_calls(monkeypatch, fail_at: int | None = None, error: BaseException | None = None) -> list:
    """Record the files of every forward pass; raise `error` on pass number `fail_at` (1-based)."""
    real_run, calls = Predictor._run, []

    def run(self, tensors, names):
        calls.append([Path(n).name for n in names])
        if fail_at is not None and len(calls) == fail_at:
            raise error
        return real_run(self, tensors, names)

    monkeypatch.setattr(Predictor, "_run", run)
    return calls


def journal_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def hidden_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


def test_interrupted_run_resumes_without_redoing_finished_images(weights, small_images, reference, tmp_path,
                                                                 monkeypatch, one_thread):
    out = tmp_path / "out"
    calls = count_model_calls(monkeypatch, fail_at=3, error=KeyboardInterrupt())
    status, _, stderr = run_cli(*options(weights, out, "--semantic"), *small_images)
    assert status == 130 and "interrupted" in stderr
    lines = journal_lines(out)
    assert lines[0]["format"] == "maskrcnn predict journal" and "complete" not in lines[-1]
    assert [line["file_name"] for line in lines[1:]] == [str(p) for p in small_images[:2]]
    assert not (out / "predictions.json").exists() and hidden_files(out) == []  # no temporary files left

    status, _, stderr = run_cli(*options(weights, out, "--semantic"), *small_images)  # forgot --resume
    assert status == 2 and len(stderr.strip().splitlines()) == 1
    assert "predictions.jsonl" in stderr and "2 input(s) done" in stderr and "--resume" in stderr

    # What a SIGKILL mid-write leaves (a temp of a process that has ended), and a file of the user's.
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    (out / f".img2.png.{ended.pid}.0123abcd.tmp").write_bytes(b"\x89PNG half")
    (out / ".notes.tmp").write_text("mine")
    calls = count_model_calls(monkeypatch)
    status, _, stderr = run_cli(*options(weights, out, "--semantic", "--resume"), *small_images)
    assert status == 0, stderr
    assert calls == [[p.name] for p in small_images[2:]]  # the finished images are not run again
    assert hidden_files(out) == [".notes.tmp"]  # the stale temp is gone, nothing else
    (out / ".notes.tmp").unlink()
    assert (out / "predictions.json").read_text() == (reference / "predictions.json").read_text()
    lines = journal_lines(out)
    assert [line["file_name"] for line in lines[1:-1]] == [str(p) for p in small_images]
    assert lines[-1] == {"complete": N_IMAGES}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_resume_with_other_settings_is_refused(weights, small_images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    count_model_calls(monkeypatch, fail_at=2, error=KeyboardInterrupt())
    assert run_cli(*options(weights, out), *small_images[:3])[0] == 130
    before = (out / "predictions.jsonl").read_bytes()
    calls = count_model_calls(monkeypatch)
    status, _, stderr = run_cli(*options(weights, out, "--resume", "--mask-threshold", 0.6), *small_images[:3])
    assert status == 2 and len(stderr.strip().splitlines()) == 1 and calls == []
    assert "predictions.jsonl" in stderr and "mask_threshold: 0.5 there, 0.6 now" in stderr
    assert (out / "predictions.jsonl").read_bytes() == before  # the journal is left alone


def test_finished_run_is_replaced_by_a_fresh_one(weights, small_images, tmp_path):
    out = tmp_path / "out"
    assert run_cli(*options(weights, out), *small_images[:3])[0] == 0
    status, _, stderr = run_cli(*options(weights, out), small_images[3])  # no --resume: a new run
    assert status == 0, stderr
    assert [line.get("file_name") for line in journal_lines(out)[1:]] == [str(small_images[3]), None]
    assert {e["file_name"] for e in json.loads((out / "predictions.json").read_text())} <= {str(small_images[3])}


def test_killed_process_resumes_to_the_same_predictions(weights, small_images, reference, tmp_path, one_thread):
    """A real SIGKILL, at whatever point the run has reached once two images are recorded: the resumed run
    removes what the kill left half-written and does not rewrite the finished images' files."""
    out = tmp_path / "out"
    python_path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=python_path)
    command = [sys.executable, "-m", "maskrcnn.cli", *map(str, options(weights, out, "--semantic")),
               *map(str, small_images)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        journal_file = out / "predictions.jsonl"
        if journal_file.is_file() and journal_file.read_bytes().count(b"\n") >= 3:  # header + 2 records
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    finished = [json.loads(line)["file_name"] for line in (out / "predictions.jsonl").read_text().splitlines()[1:]
                if line.endswith("}")]
    assert 2 <= len(finished) < N_IMAGES
    inodes = {name: (out / f"{Path(name).stem}.png").stat().st_ino for name in finished}

    status, _, stderr = run_cli(*options(weights, out, "--semantic", "--resume"), *small_images)
    assert status == 0, stderr
    assert (out / "predictions.json").read_text() == (reference / "predictions.json").read_text()
    assert inodes == {name: (out / f"{Path(name).stem}.png").stat().st_ino for name in finished}
    assert hidden_files(out) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


@pytest.mark.parametrize("target", ["overlay", "journal", "predictions.json"])
def test_full_disk_is_one_line_and_exit_1(weights, small_images, tmp_path, monkeypatch, target):
    out = tmp_path / "out"
    full = OSError(errno.ENOSPC, "No space left on device")
    if target == "overlay":
        real_save, saves = Image.Image.save, []

        def save(self, fp, *args, **kwargs):  # the second overlay: half a file, then the disk is full
            saves.append(fp)
            if len(saves) == 2:
                Path(fp).write_bytes(b"\x89PNG\r\n")
                raise full
            return real_save(self, fp, *args, **kwargs)

        monkeypatch.setattr(Image.Image, "save", save)
        failed = out / "img1.png"
    elif target == "journal":
        def append(self, record):
            raise full

        monkeypatch.setattr(journal.Writer, "append", append)
        failed = out / "predictions.jsonl"
    else:
        import maskrcnn.commands.predict as predict

        def write_json(path, data):
            raise full

        monkeypatch.setattr(predict, "write_json_atomic", write_json)
        failed = out / "predictions.json"
    status, _, stderr = run_cli(*options(weights, out), *small_images[:3])
    assert status == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"maskrcnn predict: error: {failed}: cannot write: No space")
    assert "--resume" in lines[0]
    assert hidden_files(out) == [] and not (out / "predictions.json").exists()
    if target == "overlay":
        assert not failed.exists()  # no half-written PNG under the final name
        assert [line["file_name"] for line in journal_lines(out)[1:]] == [str(small_images[0])]

    monkeypatch.undo()
    calls = count_model_calls(monkeypatch)
    status, _, stderr = run_cli(*options(weights, out, "--resume"), *small_images[:3])
    assert status == 0, stderr
    done_before = {"overlay": 1, "journal": 0, "predictions.json": 3}[target]
    assert len(calls) == 3 - done_before
    assert len(journal_lines(out)) == 1 + 3 + 1


def test_too_large_and_out_of_memory_images_cost_only_themselves(weights, small_images, tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("1", (12000, 12000)).save(big)  # 144 million pixels, a small file
    hungry = tmp_path / "hungry.png"
    Image.fromarray(np.asarray(Image.open(small_images[1]))[::-1]).save(hungry)
    calls = count_model_calls(monkeypatch, fail_at=2, error=MemoryError())  # hungry.png's forward pass
    out = tmp_path / "out"
    inputs = [small_images[0], hungry, big, small_images[2]]
    status, stdout, stderr = run_cli(*options(weights, out), *inputs)
    assert status == 1 and "2 input(s) done, 2 failed" in stdout
    lines = stderr.strip().splitlines()
    assert len(lines) == 2
    assert "hungry.png: not enough memory" in lines[0]
    assert "big.png: image has 12000x12000 = 144.0 million pixels" in lines[1] and "--max-pixels" in lines[1]
    assert [c[0] for c in calls] == ["img0.png", "hungry.png", "img2.png"]  # big.png never reached the model
    records = {line["file_name"]: line for line in journal_lines(out)[1:-1]}
    assert [records[str(p)]["ok"] for p in inputs] == [True, False, False, True]
    assert "million pixels" in records[str(big)]["error"]
    assert (out / "img0.png").is_file() and (out / "img2.png").is_file() and not (out / "big.png").exists()
    predicted = {e["file_name"] for e in json.loads((out / "predictions.json").read_text())}
    assert predicted <= {str(small_images[0]), str(small_images[2])}


def test_torchrun_resumes_a_single_process_run(weights, small_images, reference, tmp_path, monkeypatch,
                                               one_thread):
    """Two processes continue an interrupted run: each takes its share of the images still to do, and the
    parts are folded into one complete journal and the same predictions.json."""
    out = tmp_path / "out"
    count_model_calls(monkeypatch, fail_at=2, error=KeyboardInterrupt())
    assert run_cli(*options(weights, out, "--semantic"), *small_images)[0] == 130
    python_path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=python_path)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "maskrcnn.cli",
         *map(str, options(weights, out, "--semantic", "--resume")), *map(str, small_images)],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "predictions.json").read_text() == (reference / "predictions.json").read_text()
    lines = journal_lines(out)
    assert [line["file_name"] for line in lines[1:-1]] == [str(p) for p in small_images]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())  # no parts left
