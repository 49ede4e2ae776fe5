"""maskrcnn demo: the whole job offline in about ten minutes on a laptop CPU.

synthetic dataset -> training (sized to the time budget) -> COCO evaluation -> predictions on held-out
images -> DIR/report.html. Each step's result stays in DIR; a second run reuses what is done.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path

from ..checks import COUNT, POSITIVE
from ._options import add_device_option, add_precision_option

NAME = "demo"
HELP = "run the whole job offline (shapes data -> train -> evaluate -> predict) and write report.html"
ORDER = 0

NUM_TRAIN, NUM_VAL, NUM_OVERLAYS = 400, 60, 12
MARKER = ".maskrcnn-demo"  # in every --out folder the demo made: the only folders --fresh deletes


def add_arguments(p) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--minutes", type=POSITIVE.flag, default=10.0,
                   help="rough time budget for the whole demo on this machine (default 10)")
    p.add_argument("--iters", type=COUNT.flag, default=None, help="training iterations (default: fit the time budget)")
    add_device_option(p)
    p.add_argument("--fresh", action="store_true",
                   help=f"delete the --out folder of an earlier demo (one holding its {MARKER} file) and redo "
                        "every step")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_precision_option(p)  # the overlays' predictions; the COCO AP is measured in exact fp32


def prepare_out(out: Path, fresh: bool) -> None:
    """Create `out` for the demo, marking a folder it made (or found empty) with MARKER; with `fresh`, first
    delete a folder that carries the marker. A folder without it may hold the user's files (`--out .`), so
    `fresh` refuses it rather than deleting anything there."""
    from ..errors import MaskRCNNError
    from ..files import has_marker, mark_folder

    if out.exists() and not out.is_dir():
        raise MaskRCNNError(f"--out {out}: exists and is not a folder")
    empty = not out.exists() or not any(out.iterdir())
    if fresh and not empty:
        if not has_marker(out, MARKER) or out.is_symlink():
            raise MaskRCNNError(f"--out {out}: --fresh deletes only a folder made by `maskrcnn demo` (one "
                                f"holding its {MARKER} file), and this one has none; delete it yourself or choose "
                                "another --out")
        shutil.rmtree(out)
        empty = True
    if empty:
        mark_folder(out, MARKER, "made by `maskrcnn demo`; `maskrcnn demo --fresh` deletes this folder\n")


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def run(args) -> int:
    from ..devices import resolve_device

    started = time.time()
    out = Path(args.out)
    device = str(resolve_device(args.device))
    prepare_out(out, args.fresh)
    progress = not args.no_progress
    data = _dataset(out / "data", progress)
    config, iters = _training(args, data, out / "run", device, started, progress)
    model, val_set, metrics = _evaluation(args, data, out / "run" / "model.safetensors", out / "eval", device,
                                          progress)
    overlay_thresh, overlays = _overlays(model, val_set, out, out / "eval" / "predictions.json", args.precision)
    _report(out, data, config, iters, model, metrics, overlay_thresh, overlays, device, started)
    return 0


def _annotations(data: Path) -> tuple[Path, Path]:
    return data / "annotations" / "instances_train.json", data / "annotations" / "instances_val.json"


def _dataset(data: Path, progress: bool) -> Path:
    """1. The synthetic shapes dataset, made once."""
    from ..data.synthetic import make_shapes

    train_json, val_json = _annotations(data)
    if train_json.is_file() and val_json.is_file():
        _say(f"1/5 dataset: reusing {data}")
    else:
        _say(f"1/5 dataset: writing {NUM_TRAIN} train + {NUM_VAL} val synthetic images to {data}")
        make_shapes(data, num_train=NUM_TRAIN, num_val=NUM_VAL, seed=0, progress=progress)
    return data


def _training(args, data: Path, run_dir: Path, device: str, started: float, progress: bool):
    """2. Training from scratch, sized to the time budget; a finished run is reused, a cut one resumed."""
    import torch

    from ..engine.train import TrainConfig, resolve_defaults, train
    from ..files import write_text_atomic

    train_json, val_json = _annotations(data)
    config = TrainConfig(train_annotations=str(train_json), train_images=str(data / "train"),
                         val_annotations=str(val_json), val_images=str(data / "val"), out=str(run_dir),
                         device=device, amp=device.startswith("cuda"), eval_every=None, checkpoint_every=100)
    # bf16 only where the CPU has native bf16 instructions; elsewhere it is emulated and slower than fp32
    config = resolve_defaults(config, torch.device(device))
    recorded = run_dir / "demo.json"
    if (run_dir / "model.safetensors").is_file():
        _say(f"2/5 training: reusing the finished run in {run_dir}")
        return config, json.loads(recorded.read_text())["iters"] if recorded.is_file() else None
    resume = (run_dir / "last.pt").is_file()
    if resume and recorded.is_file():
        iters = json.loads(recorded.read_text())["iters"]
    else:
        iters = args.iters or _iterations_for_budget(config, args.minutes * 60 - (time.time() - started))
    config.iters, config.epochs = iters, None
    write_text_atomic(recorded, json.dumps({"iters": iters}))
    _say(f"2/5 training: {config.arch} from scratch, {iters} iterations of {config.batch_size} images on "
         f"{device}{' (resuming)' if resume else ''}")
    train(config, resume=resume, progress=progress)
    return config, iters


def _evaluation(args, data: Path, finished: Path, eval_dir: Path, device: str, progress: bool):
    """3. COCO AP on the validation images (reused while newer than the weights)."""
    from ..data.coco import CocoDataset
    from ..engine.evaluate import coco_evaluate, format_metrics_table, predict_dataset, write_metrics
    from ..files import write_text_atomic
    from ..weights import load

    model = load(finished, device=device)
    val_set = CocoDataset(_annotations(data)[1], data / "val")
    metrics_path = eval_dir / "metrics.json"
    if metrics_path.is_file() and not args.fresh and metrics_path.stat().st_mtime >= finished.stat().st_mtime:
        _say(f"3/5 evaluation: reusing {metrics_path}")
        metrics = json.loads(metrics_path.read_text())
    else:
        _say(f"3/5 evaluation: COCO AP on {len(val_set)} validation images")
        results = predict_dataset(model, val_set, category_ids=model.category_ids, batch_size=4, device=device,
                                  progress=progress)
        metrics = coco_evaluate(val_set.coco, list(results), verbose=False)
        eval_dir.mkdir(parents=True, exist_ok=True)
        write_metrics(metrics_path, metrics)
        write_text_atomic(eval_dir / "predictions.json", json.dumps(list(results)))
    print(format_metrics_table(metrics), flush=True)
    return model, val_set, metrics


def _overlays(model, val_set, out: Path, scored_path: Path, precision: str) -> tuple[float, list[str]]:
    """4. Overlays of held-out images."""
    from ..data.images import read_image
    from ..predictor import Predictor
    from ..viz import save_png

    pred_dir = out / "predictions"
    _say(f"4/5 predictions: overlays of {NUM_OVERLAYS} held-out images in {pred_dir}")
    pred_dir.mkdir(parents=True, exist_ok=True)
    # 0.5 as usual; a short run on a slow machine may leave every score below that, and a gallery of
    # empty pictures shows nothing, so then the overlays go down to 0.3 (and the report says so).
    scored = json.loads(scored_path.read_text())
    overlay_thresh = 0.5 if any(p["score"] >= 0.5 for p in scored) else 0.3
    predictor = Predictor(model, score_thresh=overlay_thresh, precision=precision)
    overlays = []
    for path in [val_set.image_path(i) for i in range(min(NUM_OVERLAYS, len(val_set)))]:
        overlay = pred_dir / f"{Path(path).stem}.png"
        save_png(overlay, predictor(path).draw(read_image(path)))
        overlays.append(str(overlay.relative_to(out)))
    return overlay_thresh, overlays


def _report(out: Path, data: Path, config, iters, model, metrics, overlay_thresh, overlays, device, started):
    """5. report.html: figures, curves, overlays and the commands that reproduce each step."""
    import torch

    from ..engine.report import write_report

    run_dir, eval_dir, pred_dir = out / "run", out / "eval", out / "predictions"
    finished = run_dir / "model.safetensors"
    train_json, val_json = _annotations(data)
    report = out / "report.html"
    summary = {
        "dataset": f"{NUM_TRAIN} train / {NUM_VAL} val synthetic images (maskrcnn shapes), {len(model.class_names) - 1} classes",
        "model": f"{config.arch}, from scratch, backbone norm {model.config.backbone_norm}, {model.config.min_size}px",
        "training": f"{iters or '?'} iterations x {config.batch_size} images on {device}",
        "overlays": f"detections scoring at least {overlay_thresh}",
        "demo wall time": f"{(time.time() - started) / 60:.1f} min (this invocation)",
        "torch": torch.__version__,
    }
    q = shlex.quote
    commands = [
        ("Make a dataset (or use your own COCO json + image folder)",
         f"maskrcnn shapes {q(str(data))} --train {NUM_TRAIN} --val {NUM_VAL}"),
        ("Train", f"maskrcnn train --train-annotations {q(str(train_json))} --train-images {q(str(data / 'train'))} "
                  f"--val-annotations {q(str(val_json))} --val-images {q(str(data / 'val'))} --arch {config.arch} "
                  f"--iters {iters} --batch-size {config.batch_size} --out {q(str(run_dir))}"
                  + (" --bf16" if config.bf16 else "")),
        ("Evaluate", f"maskrcnn eval --weights {q(str(finished))} --annotations {q(str(val_json))} "
                     f"--images {q(str(data / 'val'))} --out {q(str(eval_dir))}"),
        ("Predict", f"maskrcnn predict --weights {q(str(finished))} --out {q(str(pred_dir))} {q(str(data / 'val'))}"),
    ]
    curves = run_dir / "curves.png"
    write_report(report, title="maskrcnn demo", summary=summary, metrics=metrics,
                 curves=str(curves.relative_to(out)) if curves.is_file() else None,
                 overlays=overlays, commands=commands)
    _say(f"5/5 report: {report.resolve()}")


def _iterations_for_budget(config, seconds: float) -> int:
    """Time a few training steps of this recipe here and fit the run (plus evaluation) into `seconds`."""
    import torch

    from ..data.coco import CocoDataset, collate
    from ..engine.train import build_training_model, training_transforms

    dataset = CocoDataset(config.train_annotations, config.train_images, transforms=training_transforms(config),
                          augment_seed=config.seed)
    model, _ = build_training_model(config, dataset.num_classes, dataset.class_names, dataset.category_ids)
    model.transform.resize_in_training = False
    model.train()
    images, targets = collate([dataset[i] for i in range(config.batch_size)])
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            losses = model(list(images), list(targets))
        sum(losses.values()).backward()
        timings.append(time.perf_counter() - start)
    per_iter = min(timings[1:]) * 1.3  # optimiser step, data loading, logging, a busy machine (measured: ~1.25)
    budget = max(seconds, 60) * 0.85 - 30  # evaluation, overlays and the report
    return int(min(max(budget / per_iter, 50), 2000))
