"""`maskrcnn demo` end to end on a shrunken dataset: every step runs, the report holds real figures and
pictures, and a second run reuses what is done."""

from __future__ import annotations

import contextlib
import io
import json
import re

from maskrcnn.cli import main
from maskrcnn.commands import demo


def test_demo_writes_a_report_and_reuses_finished_steps(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(demo, "NUM_TRAIN", 8)
    monkeypatch.setattr(demo, "NUM_VAL", 4)
    monkeypatch.setattr(demo, "NUM_OVERLAYS", 2)
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--iters", "2", "--device", "cpu", "--no-progress"]
    first = io.StringIO()
    with contextlib.redirect_stdout(first):
        assert main(args) == 0

    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(metrics) >= {"bbox", "segm"} and 0 <= metrics["segm"]["AP"] <= 1
    report = (out / "report.html").read_text()
    # The AP table shows the numbers of metrics.json (in percent), not placeholders.
    assert f"<td>{100 * metrics['bbox']['AP']:.1f}</td>" in report
    overlays = sorted((out / "predictions").glob("*.png"))
    assert len(overlays) == 2 and all(f'src="predictions/{p.name}"' in report for p in overlays)
    assert (out / "run" / "curves.png").is_file() and 'src="run/curves.png"' in report
    assert re.search(r"maskrcnn train --train-annotations \S+ .*--iters 2 ", report)
    assert json.loads((out / "run" / "demo.json").read_text()) == {"iters": 2}

    weights_time = (out / "run" / "model.safetensors").stat().st_mtime
    second = io.StringIO()
    with contextlib.redirect_stdout(second):
        assert main(args) == 0
    log = second.getvalue()
    assert "1/5 dataset: reusing" in log and "2/5 training: reusing" in log and "3/5 evaluation: reusing" in log
    assert (out / "run" / "model.safetensors").stat().st_mtime == weights_time
