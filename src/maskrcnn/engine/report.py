"""report.html: what a run did and how well, with pictures, in one page that opens without a server."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from ..files import write_text_atomic

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _pct(value) -> str:
    if value is None or not isinstance(value, (int, float)) or value != value or value < 0:
        return "–"
    return f"{100 * value:.1f}"


def _metrics_table(metrics: dict) -> str:
    rows = []
    for kind in ("bbox", "segm"):
        if kind in metrics:
            cells = "".join(f"<td>{_pct(metrics[kind].get(k))}</td>" for k in METRIC_KEYS)
            rows.append(f"<tr><th>{kind}</th>{cells}</tr>")
    head = "".join(f"<th>{k}</th>" for k in METRIC_KEYS)
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def _per_class_table(metrics: dict) -> str:
    per_class = metrics.get("per_class") or {}
    names = sorted(set(per_class.get("bbox", {})) | set(per_class.get("segm", {})))
    if not names:
        return "<p>No per-class figures.</p>"
    rows = "".join(
        f"<tr><th>{html.escape(n)}</th><td>{_pct(per_class.get('bbox', {}).get(n))}</td>"
        f"<td>{_pct(per_class.get('segm', {}).get(n))}</td></tr>" for n in names)
    return f"<table><tr><th>class</th><th>box AP</th><th>mask AP</th></tr>{rows}</table>"


def write_report(path: str | os.PathLike, *, title: str, summary: dict[str, str], metrics: dict,
                 curves: str | None, overlays: list[str], commands: list[tuple[str, str]]) -> Path:
    """Write the page atomically. Image paths are relative to the report's folder."""
    path = Path(path)
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in summary.items())
    gallery = "".join(f'<figure><a href="{html.escape(o)}"><img src="{html.escape(o)}" loading="lazy"></a>'
                      f"<figcaption>{html.escape(Path(o).stem)}</figcaption></figure>" for o in overlays)
    steps = "".join(f"<h3>{html.escape(what)}</h3><pre>{html.escape(cmd)}</pre>" for what, cmd in commands)
    curves_html = f'<img class="wide" src="{html.escape(curves)}">' if curves else "<p>No curves recorded.</p>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }}
th {{ background: #f4f4f4; text-align: left; }}
.gallery {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 0.8em; }}
figure {{ margin: 0; }} figure img {{ width: 100%; border: 1px solid #ddd; }}
figcaption {{ font-size: 0.85em; color: #555; }}
img.wide {{ max-width: 100%; border: 1px solid #ddd; }}
pre {{ background: #f6f8fa; padding: 0.7em; overflow-x: auto; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<table>{facts}</table>
<h2>COCO AP on the validation images (percent)</h2>
{_metrics_table(metrics)}
<h2>Training curves</h2>
{curves_html}
<h2>Predictions on held-out images</h2>
<div class="gallery">{gallery}</div>
<h2>Per-class AP (percent)</h2>
{_per_class_table(metrics)}
<h2>Repeat each step on your own data</h2>
{steps}
<h3>Raw numbers</h3><pre>{html.escape(json.dumps({k: metrics[k] for k in ("bbox", "segm") if k in metrics}, indent=1))}</pre>
</body></html>
"""
    write_text_atomic(path, page)
    return path
