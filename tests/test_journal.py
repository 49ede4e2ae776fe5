"""The predict journal (predictions.jsonl): what a kill leaves is read back, and only our own files are
replaced."""

from __future__ import annotations

import json

import pytest

from maskrcnn import journal
from maskrcnn.errors import MaskRCNNError

HEADER = journal.make_header({"weights": "sha256:00", "score_thresh": 0.5})


def record(name: str, ok: bool = True) -> dict:
    return {"file_name": name, "output_name": name, "ok": ok, "error": "" if ok else "bad", "entries": [],
            "counts": []}


def test_a_line_cut_short_by_a_kill_is_dropped_and_the_next_record_starts_clean(tmp_path):
    path = tmp_path / journal.JOURNAL
    writer = journal.Writer(path, HEADER)
    writer.append(record("a.jpg"))
    writer.close()
    with open(path, "a") as f:
        f.write('{"file_name": "b.jpg", "ok": tr')  # killed in the middle of a line
    header, records, complete = journal.read(path)
    assert header == HEADER and [r["file_name"] for r in records] == ["a.jpg"] and not complete
    writer = journal.Writer(path, HEADER)  # resuming: appends, header not repeated
    writer.append(record("b.jpg"))
    writer.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line).get("file_name") for line in lines] == [None, "a.jpg", "b.jpg"]


def test_damage_before_the_last_line_or_a_foreign_file_is_refused_and_kept(tmp_path):
    path = tmp_path / journal.JOURNAL
    path.write_text(json.dumps(HEADER) + "\nnot json\n" + json.dumps(record("a.jpg")) + "\n")
    with pytest.raises(MaskRCNNError, match=r"predictions\.jsonl: line 2 is not JSON"):
        journal.start(tmp_path, HEADER, resume=True)
    path.write_text('{"some": "other tool"}\n')
    for resume in (False, True):
        with pytest.raises(MaskRCNNError, match=r"predictions\.jsonl: not a maskrcnn predict journal"):
            journal.start(tmp_path, HEADER, resume=resume)
    assert path.read_text() == '{"some": "other tool"}\n'


def test_retried_failure_replaces_the_failed_record_and_success_is_never_replaced(tmp_path):
    writer = journal.Writer(tmp_path / journal.JOURNAL, HEADER)
    for r in (record("a.jpg", ok=False), record("b.jpg"), record("c.jpg", ok=False)):
        writer.append(r)
    writer.close()
    part = journal.Writer(tmp_path / journal.part_name(1), HEADER)  # a torchrun process's part
    part.append(record("a.jpg"))
    part.append(record("b.jpg", ok=False))
    part.close()
    previous, replace = journal.start(tmp_path, HEADER, resume=True)
    assert not replace
    assert {name: r["ok"] for name, r in previous.items()} == {"a.jpg": True, "b.jpg": True, "c.jpg": False}
    found = journal.finish(tmp_path, HEADER, ["c.jpg", "a.jpg"])
    assert sorted(found) == ["a.jpg", "b.jpg", "c.jpg"]
    names = [json.loads(line).get("file_name") for line in (tmp_path / journal.JOURNAL).read_text().splitlines()]
    assert names == [None, "c.jpg", "a.jpg", "b.jpg", None]  # this run's order, then the others; complete
    assert sorted(p.name for p in tmp_path.iterdir()) == [journal.JOURNAL]  # the part is folded in
    assert journal.read(tmp_path / journal.JOURNAL)[2]
