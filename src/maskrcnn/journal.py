"""The predict journal: `predictions.jsonl`, one line per finished input, so a killed run loses nothing.

Line 1 is a header with the settings the results depend on; every later line is one input's record
(`file_name`, `output_name`, `ok`, `error`, `entries`, `counts`), appended and flushed to disk as soon as that
input's output files are written; a run that finishes rewrites the file in input order and ends it with a
`{"complete": ...}` line. Under torchrun each process appends to its own `predictions.rank<R>.jsonl`, which
the main process folds into `predictions.jsonl` at the end.

Starting a run in a folder that has a journal (`start`): without resume, a complete journal is replaced
(a fresh run, as predictions.json always was) and an interrupted one is refused, so a crash's results are
never thrown away by a forgotten --resume; with resume, the settings must match and the recorded inputs
are handed back so the caller can skip the successful ones (a failed input is tried again, and its new
record replaces the old one; a success is never redone). A killed run's partial last line is dropped.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .errors import MaskRCNNError
from .files import write_text_atomic

JOURNAL = "predictions.jsonl"
_PART = re.compile(r"^predictions\.rank\d+\.jsonl$")
_FORMAT = "maskrcnn predict journal"


def make_header(settings: dict) -> dict:
    return {"format": _FORMAT, "version": 1, "settings": settings}


def part_name(rank: int) -> str:
    return f"predictions.rank{rank}.jsonl"


def journal_files(out: Path) -> list[Path]:
    """predictions.jsonl (when present), then the per-process parts a torchrun run left, by name."""
    files = [out / JOURNAL] if (out / JOURNAL).is_file() else []
    return files + sorted(p for p in out.iterdir() if _PART.match(p.name) and p.is_file())


def read(path: Path) -> tuple[dict | None, list[dict], bool]:
    """(header, records, complete) of one journal file; (None, [], False) for an empty one.

    A last line cut short (a kill in the middle of writing it) is ignored; any other damage is an error."""
    lines = path.read_bytes().split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()  # after the final newline
    if not lines:
        return None, [], False
    values = []
    for number, line in enumerate(lines, start=1):
        try:
            values.append(json.loads(line))
        except ValueError:
            if number == len(lines) and number > 1:
                break
            raise MaskRCNNError(f"{path}: line {number} is not JSON; not a journal this tool can resume "
                                "(choose another --out)") from None
    header = values[0]
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise MaskRCNNError(f"{path}: not a maskrcnn predict journal (its first line); choose another --out")
    records = [v for v in values[1:] if isinstance(v, dict) and "file_name" in v]
    complete = isinstance(values[-1], dict) and "complete" in values[-1]
    return header, records, complete


def start(out: Path, header: dict, resume: bool) -> tuple[dict[str, dict], bool]:
    """Check the journal files in `out` before a run (main process only); returns the records to keep, by
    file name (empty for a fresh run), and whether a finished run's journal is to be replaced (`replace`,
    once the run is ready to write). Refuses, with one line, what the module docstring says."""
    files = journal_files(out)
    found = [(path, *read(path)) for path in files]
    found = [(path, head, records, complete) for path, head, records, complete in found if head is not None]
    if not found:
        return {}, False
    if not resume:
        path, _, records, complete = found[0]
        if len(found) == 1 and path.name == JOURNAL and complete:
            return {}, True
        done = len({r["file_name"] for _, _, recs, _ in found for r in recs})
        raise MaskRCNNError(f"{path}: an interrupted run's results are here ({done} input(s) done); "
                            "continue it with --resume, or choose another --out")
    for path, head, _, _ in found:
        difference = _first_difference(head.get("settings", {}), header["settings"])
        if difference:
            raise MaskRCNNError(f"{path}: cannot --resume, made with other settings ({difference}); "
                                "use the same options and weights, or another --out")
    return _latest(r for _, _, records, _ in found for r in records), False


def replace(out: Path) -> None:
    """Remove a finished run's journal (ours: `start` checked it) that a fresh run replaces."""
    (out / JOURNAL).unlink(missing_ok=True)


def _latest(records) -> dict[str, dict]:
    """One record per file name: a later one replaces an earlier one, except that a success is never
    replaced by a failure (successes are not redone; files are read main journal first, then the parts)."""
    latest: dict[str, dict] = {}
    for record in records:
        name = record["file_name"]
        if name not in latest or record["ok"] or not latest[name]["ok"]:
            latest[name] = record
    return latest


def _first_difference(before: dict, now: dict) -> str:
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            return f"{key}: {before.get(key)!r} there, {now.get(key)!r} now"
    return ""


class Writer:
    """Appends records to one journal file, each flushed to disk before `append` returns."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        _cut_partial_line(path)
        self._file = open(path, "a", encoding="utf-8")
        if self._file.tell() == 0:
            self._write(header)

    def append(self, record: dict) -> None:
        self._write(record)

    def _write(self, value: dict) -> None:
        self._file.write(json.dumps(value) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _cut_partial_line(path: Path) -> None:
    """Drop a last line a kill cut short, so the next record starts on a line of its own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def finish(out: Path, header: dict, file_names: list[str]) -> dict[str, dict]:
    """Fold every journal file in `out` into one complete predictions.jsonl (the inputs of this run in
    order, then any others recorded earlier), remove the per-process parts, and return the records by
    file name."""
    files = journal_files(out)
    records = _latest(r for path in files for r in read(path)[1])
    order = list(dict.fromkeys([name for name in file_names if name in records] + list(records)))
    lines = [header, *(records[name] for name in order), {"complete": len(order)}]
    write_text_atomic(out / JOURNAL, "".join(json.dumps(line) + "\n" for line in lines))
    for path in files:
        if path.name != JOURNAL:
            path.unlink()
    return records
