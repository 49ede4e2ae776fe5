"""Atomic writes: all or nothing, the user's usual permissions, and killed runs' temporary files cleaned up."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from maskrcnn.files import atomic_path, remove_stale_temps, temp_path, write_text_atomic


def test_written_file_has_usual_permissions_and_no_temp_left(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "sub" / "metrics.json", "{}")
    finally:
        os.umask(umask)
    target = tmp_path / "sub" / "metrics.json"
    assert target.read_text() == "{}"
    assert target.stat().st_mode & 0o777 == 0o644  # readable by others, like any file the user writes
    assert os.listdir(tmp_path / "sub") == ["metrics.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "report.html"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.html"]


def _dead_pid() -> int:
    """The pid of a process that has ended (and, on any busy system, not yet been reused)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temps_of_ended_processes_are_removed_and_nothing_else(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    ours_dead = [f".x.png.{dead}.0123abcd.tmp", f".clip_overlay.mp4.{dead}.89abcdef.tmp.mp4"]
    keep = [f".x.png.{alive}.0123abcd.tmp",      # a process still writing it
            ".x.png.tmp", "notes.tmp", "x.png",      # not our pattern
            f".x.png.{dead}.0123ABCD.tmp",           # not our pattern (upper-case hex)
            f"x.png.{dead}.0123abcd.tmp"]            # not hidden: not ours
    for name in ours_dead + keep:
        (tmp_path / name).write_text("left behind")
    staging = tmp_path / f".model.xml.{dead}.0123abcd.tmp"  # a killed OpenVINO export's staging folder
    (staging / "inner").mkdir(parents=True)
    (staging / "inner" / "graph.onnx").write_text("half a graph")
    elsewhere = tmp_path / "user-folder"  # a link of our pattern to someone's folder: neither it nor its target
    (elsewhere / "precious.txt").parent.mkdir()
    (elsewhere / "precious.txt").write_text("keep me")
    link = tmp_path / f".link.{dead}.0123abcd.tmp"
    link.symlink_to(elsewhere, target_is_directory=True)
    keep += ["user-folder", link.name]
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(ours_dead + [staging.name])
    assert sorted(os.listdir(tmp_path)) == sorted(keep)
    assert (elsewhere / "precious.txt").read_text() == "keep me"


def test_temp_names_match_the_stale_pattern_and_keep_suffix_on_request(tmp_path):
    plain, video = temp_path(tmp_path / "a.png"), temp_path(tmp_path / "clip.mp4", keep_suffix=True)
    assert plain.name.startswith(".a.png.") and plain.name.endswith(".tmp") and plain.parent == tmp_path
    assert video.name.startswith(".clip.mp4.") and video.suffix == ".mp4"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "clip.mp4", keep_suffix=True) as tmp:
            assert tmp.suffix == ".mp4"
            tmp.write_bytes(b"half a video")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
