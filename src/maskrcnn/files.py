"""Atomic file writing: a reader (or a crash) never sees a half-written checkpoint, report or json. And the
marker file by which a command recognises an output folder it made.

Every temporary file is named `.<final name>.<pid>.<8 hex>.tmp` (plus the final suffix where a writer picks
its format from it, e.g. `.tmp.mp4`), beside the final file. A killed process leaves such files behind;
`remove_stale_temps` removes exactly those (our name pattern, written by a process that is no longer running)
and nothing else. A writer that needs several files before one rename (an OpenVINO .xml + .bin) stages them
in a folder named the same way, which `remove_stale_temps` removes whole.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

_TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp(\.[A-Za-z0-9]{1,8})?$")


def temp_path(path: str | os.PathLike, keep_suffix: bool = False) -> Path:
    """A fresh temporary name beside `path` (see the module docstring); `keep_suffix` ends it with the
    final file's suffix, for writers that choose the file format from the name (OpenCV's video writer)."""
    path = Path(path)
    suffix = path.suffix if keep_suffix else ""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `path`; when the block succeeds it is renamed onto `path`, when it
    fails (any exception, KeyboardInterrupt included) it is removed. The temp file is opened normally by the
    writer, so it gets the user's usual permissions (tempfile.mkstemp would make every result private, 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path, keep_suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def has_marker(folder: str | os.PathLike, marker: str) -> bool:
    """Whether `folder` holds `marker`, the file a command writes into an output folder it made (or took over
    empty): only in such a folder may the command delete or replace files it finds there."""
    return (Path(folder) / marker).is_file()


def mark_folder(folder: str | os.PathLike, marker: str, note: str) -> None:
    """Create `folder` if needed and write `marker` into it (once), `note` saying what made it."""
    if not has_marker(folder, marker):
        write_text_atomic(Path(folder) / marker, note)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files (and staging folders) that killed runs left in `folder`, not looking into
    its other subfolders: only names made by `temp_path`, and only those whose process is no longer running
    here, so a run writing into the same folder at the same time keeps its files. Returns what was removed."""
    removed = []
    for entry in os.scandir(folder):
        match = _TEMP_NAME.match(entry.name)
        if match is None or entry.is_symlink() or _is_running(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            elif entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
            else:
                continue
            removed.append(Path(entry.path))
    return removed


def _is_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return False  # os.kill(pid, 0) would end the process on Windows; rely on the caller's timing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or a pid too large to be one): leave its files alone
    return True
