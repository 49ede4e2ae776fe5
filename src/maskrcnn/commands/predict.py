"""maskrcnn predict: overlays, COCO-format predictions and optional maps/counts for images and videos.

Under `torchrun --nproc_per_node=N` the inputs are dealt out to the processes (process r takes inputs
r, r+N, ...); each writes its own overlays and a part file, and process 0 merges the parts into one
predictions.json in input order.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..checks import COUNT
from ..files import write_text_atomic
from ._options import add_detection_options, add_device_option, add_trust_option

NAME = "predict"
HELP = "segment images, folders, globs or videos; write overlays and predictions.json"
ORDER = 10

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm")


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (their images, sorted), glob patterns or video files "
                        "(.mp4 .avi .mov .mkv .webm)")
    p.add_argument("--weights", required=True, metavar="SRC",
                   help="checkpoint file (ours or a torchvision state dict), a registered name, or a file "
                        "from `maskrcnn export` (.onnx runs on ONNX Runtime, TorchScript only with "
                        "--trust-torchscript; exported files run on the CPU)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    add_detection_options(p, 0.5, "0.05 is usual for COCO evaluation")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="arithmetic: fp32 (exact, default), bf16 (faster on recent CPUs/GPUs), fp16 (GPU)")
    add_device_option(p)
    p.add_argument("--batch-size", type=COUNT.flag, default=1, metavar="N", help="images per forward pass (default 1)")
    add_trust_option(p)
    p.add_argument("--semantic", action="store_true",
                   help="also write <name>_semantic.png (class per pixel, palette) and <name>_instances.png "
                        "(16-bit instance ids) per image")
    p.add_argument("--counts", action="store_true",
                   help="write counts.csv (objects per image and class) and print per-class totals")
    p.add_argument("--no-overlay", action="store_true", help="skip the overlay images/videos")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------------------------- inputs

@dataclass
class InputItem:
    """One thing to predict: an image or a video, with the output name its files are written under."""

    index: int
    path: Path
    is_video: bool
    output_name: str = ""


def expand_inputs(patterns: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders and glob patterns -> (files in order, one message per pattern that found nothing).

    Globs are expanded here too, for shells (Windows) and quoting that leave them alone. A file reached
    twice (a folder and a glob over it) is predicted once.
    """
    from ..video import VIDEO_EXTENSIONS

    known = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    files: list[Path] = []
    problems: list[str] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in known)
            if not found:
                problems.append(f"{pattern}: folder has no images or videos")
        elif path.exists():
            found = [path]
        elif glob.has_magic(pattern):
            found = sorted(Path(p) for p in glob.glob(pattern)
                           if Path(p).is_file() and Path(p).suffix.lower() in known)
            if not found:
                problems.append(f"{pattern}: pattern matches no images or videos")
        else:
            found = []
            problems.append(f"{pattern}: file not found")
        files.extend(found)
    seen: set[Path] = set()
    unique = []
    for path in files:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique, problems


def _output_files(name: str, is_video: bool) -> list[str]:
    if is_video:
        return [f"{name}_overlay.mp4"]
    return [f"{name}.png", f"{name}_semantic.png", f"{name}_instances.png"]


def assign_output_names(items: list[InputItem]) -> None:
    """Give every input a name whose output files collide with no other input's.

    The first input keeps its plain stem; a later one with the same stem (a/x.jpg then b/x.jpg) gets its
    folder name in front ('b_x'), then its extension, then a number. Every process computes the same
    names from the same input list, which is what keeps torchrun runs consistent.
    """
    claimed: set[str] = set()
    for item in items:
        stem = item.path.stem
        parent = item.path.parent.name or item.path.resolve().parent.name or "root"
        extension = item.path.suffix.lstrip(".").lower()
        candidates = [stem, f"{parent}_{stem}", f"{parent}_{stem}_{extension}"]
        number = 2
        while True:
            name = candidates.pop(0) if candidates else f"{parent}_{stem}_{extension}_{number}"
            files = [f.lower() for f in _output_files(name, item.is_video)]  # case-insensitive file systems
            if not claimed.intersection(files):
                break
            if not candidates:
                number += 1
        claimed.update(files)
        item.output_name = name


# ---------------------------------------------------------------------------------------------- outputs

@dataclass
class InputRecord:
    """What one input produced, in a JSON-ready form so it can travel between processes as a file."""

    index: int
    file_name: str
    ok: bool = True
    entries: list[dict] = field(default_factory=list)
    counts: list[list] = field(default_factory=list)  # [frame or "", class name or "", count]


def coco_entries(detections, file_name: str, frame: int | None = None) -> list[dict]:
    """predictions.json entries for one image/frame, keys in a fixed, readable order."""
    entries = []
    for raw in detections.to_coco():
        entry = {"file_name": file_name}
        if frame is not None:
            entry["frame"] = frame
        for key in ("category_id", "category_name", "bbox", "score", "segmentation"):
            entry[key] = raw[key]
        entries.append(entry)
    return entries


def count_rows(entries: list[dict], frame: int | None = None) -> list[list]:
    """counts.csv rows for one image/frame; an image with nothing in it still gets a row (count 0)."""
    per_class = Counter(e["category_name"] for e in entries)
    frame_cell = "" if frame is None else frame
    if not per_class:
        return [[frame_cell, "", 0]]
    return [[frame_cell, name, count] for name, count in per_class.items()]


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data))


def write_counts_csv(path: Path, records: list[InputRecord]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file_name", "frame", "class", "count"])
    for record in records:
        if record.ok:
            for frame, name, count in record.counts:
                writer.writerow([record.file_name, frame, name, count])
    write_text_atomic(path, buffer.getvalue())


def class_totals_table(records: list[InputRecord]) -> str:
    """Per-class totals: instances, and images (or video frames) with at least one of that class."""
    instances: Counter = Counter()
    images: Counter = Counter()
    for record in records:
        if record.ok:
            for _, name, count in record.counts:
                if name:
                    instances[name] += count
                    images[name] += 1
    if not instances:
        return "no detections"
    width = max(len("class"), *(len(n) for n in instances))
    lines = [f"{'class':<{width}}  {'instances':>9}  {'images':>6}"]
    for name, count in sorted(instances.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"{name:<{width}}  {count:>9}  {images[name]:>6}")
    lines.append(f"{'total':<{width}}  {sum(instances.values()):>9}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- work

def _report(message: str) -> None:
    """One line per failed input, printed around (not through) any progress bar."""
    from tqdm import tqdm

    tqdm.write(f"maskrcnn predict: error: {message}", file=sys.stderr)


def _predict_images(predictor, items: list[InputItem], out: Path, args, progress: bool) -> list[InputRecord]:
    from ..results import save_instance_png, save_semantic_png
    from ..viz import save_png

    records = []
    results = predictor.predict_files([item.path for item in items], progress=progress, with_images=True)
    for item, (_, image, result) in zip(items, results):  # predict_files keeps the input order
        record = InputRecord(item.index, str(item.path))
        if isinstance(result, Exception):
            _report(str(result))
            record.ok = False
            records.append(record)
            continue
        result.file_name = str(item.path)
        record.entries = coco_entries(result, str(item.path))
        record.counts = count_rows(record.entries)
        if not args.no_overlay:
            # draw() stretches 16-bit and float pixels for display itself.
            save_png(out / f"{item.output_name}.png", result.draw(image))
        if args.semantic:
            save_semantic_png(out / f"{item.output_name}_semantic.png", result.semantic_map(), result.class_names)
            save_instance_png(out / f"{item.output_name}_instances.png", result.instance_map())
        records.append(record)
    return records


def _predict_video(predictor, item: InputItem, out: Path, args, progress: bool) -> InputRecord:
    from ..errors import MaskRCNNError
    from ..video import predict_video

    record = InputRecord(item.index, str(item.path))
    overlay = None if args.no_overlay else out / f"{item.output_name}_overlay.mp4"
    try:
        for frame_index, _, detections in predict_video(predictor, item.path, overlay_path=overlay,
                                                        progress=progress):
            entries = coco_entries(detections, str(item.path), frame=frame_index)
            record.entries.extend(entries)
            record.counts.extend(count_rows(entries, frame=frame_index))
    except MaskRCNNError as error:
        _report(str(error))
        record.ok = False
        record.entries, record.counts = [], []
    return record


def run(args) -> int:
    from ..engine import distributed
    from ..errors import MaskRCNNError
    from ..predictor import Predictor
    from ..video import is_video

    files, problems = expand_inputs(args.inputs)
    if not files:
        raise MaskRCNNError("no input images or videos: " + "; ".join(problems))
    items = [InputItem(i, path, is_video(path)) for i, path in enumerate(files)]
    assign_output_names(items)

    process, device = distributed.setup(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MaskRCNNError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    if process.is_main:
        for message in problems:
            _report(message)
        failures += len(problems)

    predictor = Predictor(args.weights, device=device, score_thresh=args.score_thresh,
                          mask_threshold=args.mask_threshold, batch_size=args.batch_size,
                          max_detections=args.max_detections, precision=args.precision,
                          trust_torchscript=args.trust_torchscript)
    mine = items[process.rank::process.world_size]
    progress = not args.no_progress and process.is_main
    records = _predict_images(predictor, [it for it in mine if not it.is_video], out, args, progress)
    for item in (it for it in mine if it.is_video):
        records.append(_predict_video(predictor, item, out, args, progress))
    failures += sum(not r.ok for r in records)

    if process.distributed:
        import torch

        part = out / f".predictions.rank{process.rank}.json"
        write_json_atomic(part, [asdict(r) for r in records])
        failures = int(distributed.sum_across_processes(torch.tensor([failures])).item())
        distributed.barrier()  # every part file is complete
        if process.is_main:
            parts = [out / f".predictions.rank{r}.json" for r in range(process.world_size)]
            merged = [InputRecord(**r) for p in parts for r in json.loads(p.read_text())]
            for p in parts:
                p.unlink()
            _write_merged(out, merged, args, failures)
        # Nobody exits before the merge is written: one process ending with an error makes torchrun stop
        # the others.
        distributed.barrier()
    else:
        _write_merged(out, records, args, failures)
    distributed.cleanup()
    return 1 if failures else 0


def _write_merged(out: Path, records: list[InputRecord], args, failures: int) -> None:
    records = sorted(records, key=lambda r: r.index)
    entries = [entry for record in records for entry in record.entries]
    write_json_atomic(out / "predictions.json", entries)
    if args.counts:
        write_counts_csv(out / "counts.csv", records)
        print(class_totals_table(records))
    done = sum(r.ok for r in records)
    print(f"{done} input(s) done, {failures} failed; {len(entries)} detections -> {out / 'predictions.json'}")
