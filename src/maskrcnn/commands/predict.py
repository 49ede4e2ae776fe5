"""maskrcnn predict: overlays, COCO-format predictions and optional maps/counts for images and videos.

Each input's results go to the journal, DIR/predictions.jsonl, as soon as its files are written
(maskrcnn/journal.py), so a killed run keeps them and `--resume` goes on from there; predictions.json is
written from the journal at the end. One input that cannot be read, is too large or runs out of memory
costs only itself (exit status 1 at the end); a failed write (a full disk) stops the run with one line.

Under `torchrun --nproc_per_node=N` the inputs still to do are dealt out to the processes (process r takes
r, r+N, ...); each writes its own overlays and journal part, and process 0 folds the parts into
predictions.jsonl and writes one predictions.json in input order.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import sys
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..checks import COUNT
from ..data.images import DEFAULT_MAX_PIXELS, DEFAULT_MAX_PIXELS_HELP
from ..files import write_text_atomic
from ._options import (add_detection_options, add_device_option, add_max_pixels_option, add_precision_option,
                       add_trust_option, add_weights_option, predictor_options)
from ._predict_inputs import InputItem, assign_output_names, expand_inputs

NAME = "predict"
HELP = "segment images, folders, globs or videos; write overlays and predictions.json"
ORDER = 10


def add_arguments(p) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (their images, sorted), glob patterns or video files "
                        "(.mp4 .avi .mov .mkv .webm)")
    add_weights_option(p)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (created if missing); DIR/predictions.jsonl records each input as it "
                        "finishes. A finished run's journal is replaced by a new run, an interrupted one is "
                        "refused without --resume")
    add_detection_options(p, 0.5, "0.05 is usual for COCO evaluation")
    add_precision_option(p)
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
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in DIR: inputs recorded in predictions.jsonl are skipped "
                        "(failed ones are tried again); refused if it was made with other weights or settings")
    add_max_pixels_option(p, DEFAULT_MAX_PIXELS, DEFAULT_MAX_PIXELS_HELP)

# ---------------------------------------------------------------------------------------------- outputs

@dataclass
class InputRecord:
    """What one input produced: one line of the journal (maskrcnn/journal.py), in a JSON-ready form."""

    file_name: str
    output_name: str
    ok: bool = True
    error: str = ""
    entries: list[dict] = field(default_factory=list)
    counts: list[list] = field(default_factory=list)  # [frame or "", class name or "", count]

    def fail(self, error: Exception) -> "InputRecord":
        _report(str(error))
        self.ok, self.error, self.entries, self.counts = False, str(error), [], []
        return self


def count_rows(detections, frame: int | None = None) -> list[list]:
    """counts.csv rows for one image/frame (`Detections.counts` order); an image with nothing in it still
    gets a row (count 0)."""
    frame_cell = "" if frame is None else frame
    return [[frame_cell, name, count] for name, count in detections.counts().items()] or [[frame_cell, "", 0]]


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

class _WriteFailed(Exception):
    """An output file could not be written (a full disk, a read-only folder): the run stops."""


@contextlib.contextmanager
def _writing(path: Path):
    try:
        yield
    except OSError as error:
        raise _WriteFailed(f"{path}: cannot write: {error.strerror or error}") from None


def _report(message: str) -> None:
    """One line per failed input, printed around (not through) any progress bar."""
    from tqdm import tqdm

    tqdm.write(f"maskrcnn predict: error: {message}", file=sys.stderr)


def _predict_images(predictor, items: list[InputItem], out: Path, args, progress: bool, done) -> None:
    """Predict the images, write their files and hand each one's record to `done`, in input order.

    Writing (drawing overlays, encoding PNGs, the journal line) runs in one background thread while the model
    works on the next batch; at most two images wait to be written, so memory stays bounded, and the order
    of the journal is the input order. After a write error nothing more is written (the journal stays a
    prefix of the inputs, as without the thread) and the error stops the run."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    failed = threading.Event()

    def finish(item, image, result):
        if failed.is_set():
            return
        try:
            _finish_image(item, image, result, out, args, done)
        except BaseException:
            failed.set()
            raise

    results = predictor.predict_files([item.path for item in items], progress=progress, with_images=True)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="maskrcnn-write") as pool:
        waiting: deque = deque()
        for item, (_, image, result) in zip(items, results):  # predict_files keeps the input order
            waiting.append(pool.submit(finish, item, image, result))
            while len(waiting) > 2:
                waiting.popleft().result()  # re-raises what went wrong while writing
        while waiting:
            waiting.popleft().result()


def _finish_image(item: InputItem, image, result, out: Path, args, done) -> None:
    from ..predictor import as_user_error, is_out_of_memory

    record = InputRecord(str(item.path), item.output_name)
    if isinstance(result, Exception):
        done(record.fail(result))
        return
    try:
        _write_image_outputs(record, result, image, out, args)
    except (MemoryError, RuntimeError) as error:  # drawing or mapping a huge image
        if not is_out_of_memory(error):
            raise
        record.fail(as_user_error(item.path, error))
    done(record)


def _write_image_outputs(record: InputRecord, result, image, out: Path, args) -> None:
    from ..results import save_instance_png, save_semantic_png
    from ..viz import save_png

    result.file_name = record.file_name
    record.entries = result.to_coco()
    record.counts = count_rows(result)
    if not args.no_overlay:
        path = out / f"{record.output_name}.png"
        with _writing(path):  # draw() stretches 16-bit and float pixels for display itself.
            save_png(path, result.draw(image))
    if args.semantic:
        path = out / f"{record.output_name}_semantic.png"
        with _writing(path):
            save_semantic_png(path, result.semantic_map(), result.class_names)
        path = out / f"{record.output_name}_instances.png"
        with _writing(path):
            save_instance_png(path, result.instance_map())


def _predict_video(predictor, item: InputItem, out: Path, args, progress: bool) -> InputRecord:
    from ..errors import MaskRCNNError
    from ..predictor import as_user_error, is_out_of_memory
    from ..video import predict_video

    record = InputRecord(str(item.path), item.output_name)
    overlay = None if args.no_overlay else out / f"{item.output_name}_overlay.mp4"
    try:
        with _writing(overlay) if overlay else contextlib.nullcontext():
            for frame_index, _, detections in predict_video(predictor, item.path, overlay_path=overlay,
                                                            progress=progress):
                record.entries.extend(detections.to_coco(frame=frame_index))
                record.counts.extend(count_rows(detections, frame=frame_index))
    except (MaskRCNNError, MemoryError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not is_out_of_memory(error):
            raise
        record.fail(as_user_error(item.path, error))
    return record


def _predict_all(predictor, items: list[InputItem], out: Path, args, progress: bool, writer) -> None:
    """Images first (batched), then videos; each input's record goes to the journal once its files are."""

    def done(record: InputRecord) -> None:
        with _writing(writer.path):
            writer.append(asdict(record))

    _predict_images(predictor, [it for it in items if not it.is_video], out, args, progress, done)
    for item in (it for it in items if it.is_video):
        done(_predict_video(predictor, item, out, args, progress))


def _settings(args) -> dict:
    """What the results depend on: a resumed run must match these (maskrcnn/journal.py)."""
    weights = Path(args.weights)
    if weights.is_file():
        digest = hashlib.sha256()
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        identity = f"sha256:{digest.hexdigest()}"
    else:
        identity = args.weights  # a registered name
    return {"weights": identity, "score_thresh": args.score_thresh, "mask_threshold": args.mask_threshold,
            "max_detections": args.max_detections, "precision": args.precision, "semantic": args.semantic,
            "overlay": not args.no_overlay}


def _start(process, out: Path, args) -> tuple[dict, dict, bool]:
    """The journal header, the records of the run being continued ({} for a fresh one) and whether a
    finished run's journal is to be replaced, checked by the main process (which also removes a killed
    run's temporary files) and shared with the others."""
    from .. import journal
    from ..engine import distributed
    from ..errors import MaskRCNNError
    from ..files import remove_stale_temps

    header, previous, replace, problem = None, {}, False, None
    if process.is_main:
        remove_stale_temps(out)  # before any process of this run writes one
        header = journal.make_header(_settings(args))
        try:
            records, replace = journal.start(out, header, args.resume)
            previous = {name: {"output_name": r["output_name"], "ok": r["ok"]} for name, r in records.items()}
        except MaskRCNNError as error:
            problem = str(error)
    header, previous, replace, problem = distributed.broadcast_object((header, previous, replace, problem))
    if problem:
        raise MaskRCNNError(problem)
    return header, previous, replace


def run(args) -> int:
    from .. import journal
    from ..engine import distributed
    from ..errors import MaskRCNNError
    from ..predictor import Predictor
    from ..video import is_video

    files, problems = expand_inputs(args.inputs)
    if not files:
        raise MaskRCNNError("no input images or videos: " + "; ".join(problems))
    items = [InputItem(i, path, is_video(path)) for i, path in enumerate(files)]

    process, device = distributed.setup(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MaskRCNNError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    header, previous, replace = _start(process, out, args)
    assign_output_names(items, {name: r["output_name"] for name, r in previous.items()})
    if process.is_main:
        for message in problems:
            _report(message)

    predictor = Predictor(args.weights, device=device, batch_size=args.batch_size, **predictor_options(args))
    todo = [item for item in items if not previous.get(str(item.path), {}).get("ok")]
    mine = todo[process.rank::process.world_size]
    progress = not args.no_progress and process.is_main
    path = out / (journal.part_name(process.rank) if process.distributed else journal.JOURNAL)
    try:
        with _writing(path):
            if replace and process.is_main:  # only now: a run that fails to start keeps the old journal
                journal.replace(out)
            writer = journal.Writer(path, header)
        try:
            _predict_all(predictor, mine, out, args, progress, writer)
        finally:
            writer.close()
        distributed.barrier()  # every part is complete
        failures = _finish(out, header, items, args, len(problems)) if process.is_main else 0
    except _WriteFailed as error:
        _report(f"{error}; the finished inputs are recorded in {path}: free space, then rerun with --resume")
        distributed.cleanup(finished=False)
        return 1
    # Nobody exits before the merge is written: one process ending with an error makes torchrun stop the
    # others.
    failures = distributed.broadcast_object(failures)
    distributed.cleanup()
    return 1 if failures else 0


def _finish(out: Path, header: dict, items: list[InputItem], args, failures: int) -> int:
    """Fold the journal, write predictions.json (and counts.csv) for this run's inputs; returns the number
    of failed inputs and input patterns."""
    from .. import journal

    names = [str(item.path) for item in items]
    with _writing(out / journal.JOURNAL):
        found = journal.finish(out, header, names)
    records = [InputRecord(**found[name]) for name in names if name in found]
    failures += sum(not r.ok for r in records) + len(names) - len(records)
    entries = [entry for record in records for entry in record.entries]
    with _writing(out / "predictions.json"):
        write_json_atomic(out / "predictions.json", entries)
    if args.counts:
        with _writing(out / "counts.csv"):
            write_counts_csv(out / "counts.csv", records)
        print(class_totals_table(records))
    done = sum(r.ok for r in records)
    print(f"{done} input(s) done, {failures} failed; {len(entries)} detections -> {out / 'predictions.json'}")
    return failures
