"""maskrcnn eval: COCO box and mask AP of a checkpoint on a COCO-format dataset (and keypoint OKS AP when the
annotations have keypoints and the model predicts them)."""

from __future__ import annotations

from ..checks import COUNT
from ._options import add_detection_options, add_device_option

NAME = "eval"
HELP = "COCO bbox and segm AP (and keypoint AP) of a checkpoint on a COCO-format dataset"
ORDER = 30


def add_arguments(p) -> None:
    p.add_argument("--weights", required=True, metavar="CKPT",
                   help="checkpoint: ours (.safetensors, last.pt), a torchvision state dict, or a registered name")
    p.add_argument("--annotations", required=True, metavar="JSON", help="COCO instances or keypoints json (ground truth)")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of the images the json lists")
    p.add_argument("--out", metavar="DIR", help="write DIR/metrics.json and DIR/predictions.json")
    add_device_option(p)
    p.add_argument("--batch-size", type=COUNT.flag, default=2, help="images per forward pass (default 2)")
    add_detection_options(p, 0.05, "as in COCO evaluation")
    p.add_argument("--proposals", type=COUNT.flag, metavar="N",
                   help="RPN proposals per image for the box head (default: the checkpoint's setting)")
    p.add_argument("--per-class", action="store_true", help="also print AP per class")
    p.add_argument("--skip-invalid", action="store_true",
                   help="leave out images and annotations with problems (one warning) instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_classes(model, dataset, weights: str) -> None:
    """The model's labels must map onto the dataset's categories, or every AP would silently be 0.

    A model fits when each dataset category id is one the model predicts (so a 91-output COCO model fits
    any COCO subset); where both sides name a category, the names must agree."""
    from ..errors import MaskRCNNError

    model_ids = {int(c): i for i, c in enumerate(model.category_ids) if i > 0}
    data_ids = dataset.category_ids[1:]
    missing = [c for c in data_ids if c not in model_ids]
    if missing:
        raise MaskRCNNError(
            f"{weights}: the checkpoint's classes do not fit {dataset.annotations_path}: the model has "
            f"{model.num_classes - 1} classes (category ids {_short(sorted(model_ids))}), the dataset has "
            f"{len(data_ids)} (ids {_short(data_ids)}); {len(missing)} dataset categories have no model class")
    model_names = model.class_names
    for label, name in zip(dataset.category_ids[1:], dataset.class_names[1:]):
        ours = model_names[model_ids[label]]
        if ours not in (name, "N/A") and not ours.startswith("class_"):
            raise MaskRCNNError(f"{weights}: category id {label} is {name!r} in {dataset.annotations_path} "
                                f"but {ours!r} in the checkpoint: the class lists do not match")


def _short(ids) -> str:
    ids = list(ids)
    return ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")


def run(args) -> int:
    import json
    import sys
    from pathlib import Path

    from .. import load
    from ..data.coco import CocoDataset
    from ..devices import resolve_device
    from ..engine.evaluate import coco_evaluate, format_metrics_table, predict_dataset, write_metrics
    from ..files import write_text_atomic

    device = resolve_device(args.device)
    dataset = CocoDataset(args.annotations, args.images, skip_invalid=args.skip_invalid)  # files checked here
    model = load(args.weights, device=device, score_thresh=args.score_thresh, proposals=args.proposals,
                 detections_per_img=args.max_detections)
    check_classes(model, dataset, args.weights)

    results = predict_dataset(model, dataset, category_ids=model.category_ids, batch_size=args.batch_size,
                              mask_threshold=args.mask_threshold, device=device, progress=not args.no_progress)
    known = set(dataset.category_ids[1:])
    scored = [r for r in results if r["category_id"] in known]  # e.g. COCO's unused "N/A" outputs
    metrics = coco_evaluate(dataset.coco, scored, verbose=False)  # bbox, segm (+ keypoints when both have them)

    print(f"{args.weights} on {args.annotations} ({len(dataset)} images, {len(scored)} detections)")
    print(format_metrics_table(metrics))
    if args.per_class:
        for task in ("bbox", "segm", "keypoints"):
            for name, ap in metrics["per_class"].get(task, {}).items():
                print(f"{task} AP {100 * ap:5.1f}  {name}")
    if args.out:
        out = Path(args.out)
        write_metrics(out / "metrics.json", metrics)
        write_text_atomic(out / "predictions.json", json.dumps(scored))
        print(f"wrote {out / 'metrics.json'} and {out / 'predictions.json'}")
    if results.failures:
        print(f"maskrcnn eval: {len(results.failures)} images failed during inference and count as misses "
              f"(see the warnings above)", file=sys.stderr)
        return 1
    return 0
