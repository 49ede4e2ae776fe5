"""Atomic writes: all or nothing, and the user's usual permissions."""

from __future__ import annotations

import os

import pytest

from maskrcnn.files import atomic_path, write_text_atomic


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
