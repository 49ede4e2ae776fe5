"""COCO evaluation: run a model over a dataset, score the detections with pycocotools.

Metrics come straight from pycocotools' COCOeval so numbers are comparable with published results; this
module only adds what pycocotools lacks: empty result lists, quiet mode, per-class AP, isolation of
images that fail during inference, and an atomic metrics.json.

Metrics layout (what `coco_evaluate` returns and `write_metrics` writes)::

    {"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl"},      # COCOeval.stats[:6], 0-1 scale
     "segm": {...},
     "keypoints": {"AP", "AP50", "AP75", "APm", "APl"},     # OKS; only with keypoints on both sides
     "per_class": {"bbox": {class_name: AP}, "segm": {...}}}   # AP@[.5:.95], all areas, 100 dets
                                                              # (keypoints: 20 dets, as pycocotools)

A value of -1.0 is pycocotools' "undefined" (no ground truth in that area range). Categories without any
ground truth in the evaluated images have no defined AP and are omitted from `per_class`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..checks import COUNT, PROBABILITY
from .evaluate_keypoints import check_keypoint_lengths, keypoint_categories, keypoint_results, keypoint_sigmas
from ..errors import MaskRCNNError, first_line
from ..files import write_text_atomic
from ..masks import MaskCrops
from ..modeling.model import MaskRCNN
from ..results import coco_results, encode_rle, mask_pixels

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm", "keypoints")
KEYPOINT_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl")  # COCOeval.stats[:5] for keypoints (no small)


# --------------------------------------------------------------------------------------------- metrics


def _quiet(verbose: bool):
    """pycocotools prints progress chatter unconditionally; swallow it unless asked for."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def load_coco_gt(coco_gt, verbose: bool = False) -> COCO:
    """Accept a COCO object or a json path, and fill fields COCOeval needs but hand-made files may lack.

    The annotations are checked first (maskrcnn/data/validate.py): pycocotools reads e.g. a 4-number
    polygon as a box and fails, and rasterizes NaN or huge coordinates without bound."""
    from ..data.coco import build_coco, load_json
    from ..data.validate import checked_coco
    from ..data.validate_keypoints import labelled_keypoints

    if not isinstance(coco_gt, COCO):
        path = Path(coco_gt)
        with _quiet(verbose):
            coco_gt = build_coco(checked_coco(load_json(path), str(path), images_dir=None))
    elif not getattr(coco_gt, "maskrcnn_checked", False):
        checked_coco(coco_gt.dataset, "the ground-truth COCO object", images_dir=None)
    coco_gt.maskrcnn_checked = True
    for annotation in coco_gt.anns.values():
        if annotation.get("segmentation") == []:
            # No polygon: an empty mask, which pycocotools fails on (IndexError) as an empty list.
            image = coco_gt.imgs[annotation["image_id"]]
            annotation["segmentation"] = {"size": [image["height"], image["width"]],
                                          "counts": [image["height"] * image["width"]]}
        # COCOeval indexes `iscrowd` and `area` directly and raises KeyError without them.
        annotation.setdefault("iscrowd", 0)
        if "keypoints" in annotation and "num_keypoints" not in annotation:
            annotation["num_keypoints"] = labelled_keypoints(annotation["keypoints"])
        if "area" not in annotation:
            if "segmentation" in annotation:
                annotation["area"] = float(mask_utils.area(coco_gt.annToRLE(annotation)))
            else:
                annotation["area"] = float(annotation["bbox"][2] * annotation["bbox"][3])
    return coco_gt


def _check_results(coco_gt: COCO, results: list[dict], iou_types) -> None:
    """Turn pycocotools' bare asserts (and silent ignores) into messages that say what is wrong."""
    gt_images = set(coco_gt.getImgIds())
    unknown = sorted({r["image_id"] for r in results} - gt_images)
    if unknown:
        shown = ", ".join(str(i) for i in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise MaskRCNNError(f"{len(unknown)} image ids in the results are not in the ground truth ({shown}); "
                            f"wrong annotation file?")
    for iou_type in iou_types:
        key = {"segm": "segmentation", "bbox": "bbox", "keypoints": "keypoints"}[iou_type]
        scored = keypoint_results(coco_gt, results) if iou_type == "keypoints" else results
        missing = sum(1 for r in scored if key not in r)
        if missing:
            raise MaskRCNNError(f"{iou_type} evaluation needs '{key}' in every result; {missing} of "
                                f"{len(scored)} results lack it")
        if iou_type == "keypoints":
            check_keypoint_lengths(coco_gt, scored)
    unknown_categories = sorted({r["category_id"] for r in results} - set(coco_gt.getCatIds()))
    if unknown_categories:
        # COCOeval silently ignores these, which would look like a bad model instead of a bad mapping.
        warnings.warn(f"results contain category ids not in the ground truth, ignored by the evaluation: "
                      f"{unknown_categories[:10]}", stacklevel=3)


def default_iou_types(coco_gt: COCO, results: list[dict]) -> tuple[str, ...]:
    """bbox; segm unless the results are those of a box + keypoint model (keypoints and no mask anywhere);
    keypoints when the ground truth has keypoint categories and a result has keypoints."""
    predicts_keypoints = any("keypoints" in r for r in results)
    with_masks = not predicts_keypoints or any("segmentation" in r for r in results)
    with_keypoints = bool(keypoint_categories(coco_gt)) and predicts_keypoints
    return ("bbox",) + ("segm",) * with_masks + ("keypoints",) * with_keypoints


def _results_coco(coco_gt: COCO, results: list[dict], iou_type: str) -> COCO:
    """Results as a COCO object, without mutating the caller's dicts (loadRes writes into them).

    For segm the box is dropped so loadRes derives area from the mask: COCOeval's area ranges for
    unmatched detections must use mask area, as in the official evaluation of segmentation results. For
    keypoints both are dropped, so that loadRes takes the area of the keypoints' extent, as pycocotools
    does for keypoint results (torchvision's references write them without box or mask too).
    """
    drop = {"segm": ("bbox",), "bbox": ("segmentation",), "keypoints": ("bbox", "segmentation")}[iou_type]
    if iou_type == "keypoints":
        results = keypoint_results(coco_gt, results)
    anns = [{k: v for k, v in r.items() if k not in drop} for r in results]
    if not anns:
        # loadRes indexes anns[0]; an empty results object is the same images/categories with no annotations.
        res = COCO()
        res.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                       "annotations": []}
        res.createIndex()
        return res
    return coco_gt.loadRes(anns)


def _per_class_ap(coco_eval: COCOeval, coco_gt: COCO) -> dict[str, float]:
    """AP@[.5:.95] per category (area 'all', 100 detections), the per-class analogue of stats[0]."""
    precision = coco_eval.eval["precision"]  # (T IoUs, R recalls, K categories, A areas, M maxDets)
    area_index = coco_eval.params.areaRngLbl.index("all")
    det_index = coco_eval.params.maxDets.index(100) if 100 in coco_eval.params.maxDets else -1
    names = [str(coco_gt.cats[c].get("name", c)) for c in coco_eval.params.catIds]
    per_class = {}
    for k, category_id in enumerate(coco_eval.params.catIds):
        values = precision[:, :, k, area_index, det_index]
        values = values[values > -1]
        if values.size == 0:  # no ground truth for this category: AP undefined, left out
            continue
        name = names[k] if names.count(names[k]) == 1 else f"{names[k]} ({category_id})"
        per_class[name] = float(values.mean())
    return per_class


def coco_evaluate(coco_gt, results: list[dict], iou_types=None, verbose: bool = True) -> dict:
    """COCO metrics of `results` against `coco_gt` (COCO object or annotation json path).

    Every ground-truth image is evaluated, so images without detections count as misses. See the module
    docstring for the returned layout. Empty `results` give AP 0 (pycocotools' loadRes cannot take them).
    `iou_types` None: `default_iou_types` (bbox, segm, and keypoints where both sides have them). Keypoints
    are scored by OKS on the categories that define keypoints, with `keypoint_sigmas`.
    """
    coco_gt = load_coco_gt(coco_gt, verbose=verbose)
    results = list(results)
    iou_types = default_iou_types(coco_gt, results) if iou_types is None else iou_types
    iou_types = (iou_types,) if isinstance(iou_types, str) else tuple(iou_types)
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"unsupported iou type {iou_type!r}; expected one of {IOU_TYPES}")
        if iou_type == "keypoints" and not keypoint_categories(coco_gt):
            raise MaskRCNNError("keypoints evaluation needs a ground truth with keypoints (no category has any)")
    _check_results(coco_gt, results, iou_types)

    metrics: dict = {}
    per_class: dict = {}
    for iou_type in iou_types:
        with _quiet(False):
            coco_dt = _results_coco(coco_gt, results, iou_type)
            coco_eval = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            coco_eval.params.imgIds = sorted(coco_gt.getImgIds())
            if iou_type == "keypoints":
                coco_eval.params.catIds = keypoint_categories(coco_gt)
                coco_eval.params.kpt_oks_sigmas = keypoint_sigmas(coco_gt)
            coco_eval.evaluate()
            coco_eval.accumulate()
        if verbose:
            print(f"IoU metric: {iou_type}")
        with _quiet(verbose):
            coco_eval.summarize()
        names = KEYPOINT_STAT_NAMES if iou_type == "keypoints" else STAT_NAMES
        metrics[iou_type] = {name: float(value) for name, value in zip(names, coco_eval.stats)}
        per_class[iou_type] = _per_class_ap(coco_eval, coco_gt)
    metrics["per_class"] = per_class
    return metrics


def format_metrics_table(metrics: dict) -> str:
    """Percent with one decimal, one row per IoU type; '-' where pycocotools reports undefined (-1)."""
    rows = [iou_type for iou_type in IOU_TYPES if iou_type in metrics]
    width, label = 7, max([5] + [len(row) + 1 for row in rows])
    lines = ["".ljust(label) + "".join(name.rjust(width) for name in STAT_NAMES)]
    for iou_type in rows:
        cells = []
        for name in STAT_NAMES:
            value = metrics[iou_type].get(name)
            undefined = value is None or not math.isfinite(value) or value < 0
            cells.append(("-" if undefined else f"{100 * value:.1f}").rjust(width))
        lines.append(iou_type.ljust(label) + "".join(cells))
    return "\n".join(lines)


def _json_safe(value):
    """Strict JSON has no NaN/Infinity; write them as null so any JSON reader accepts the file."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(path, metrics: dict) -> None:
    """Write metrics.json via a temp file and os.replace, so readers never see a half-written file."""
    write_text_atomic(path, json.dumps(_json_safe(metrics), indent=2, allow_nan=False) + "\n")


# ------------------------------------------------------------------------------------------- inference


@dataclass(frozen=True)
class ImageFailure:
    """One image that produced no results: `image_id` is None when even loading the item failed
    and the dataset has no `image_ids` list to look it up in; `index` is its position in the dataset."""

    index: int
    image_id: int | None
    error: str


class PredictionResults(list):
    """COCO results (a plain list of dicts, usable anywhere a list is) plus the images that failed.

    Failed images are simply absent from the results, so evaluating them counts them as misses; callers
    that must not report partial metrics silently check `failures` (e.g. exit non-zero when it is non-empty).
    """

    def __init__(self, results=(), failures=()):
        super().__init__(results)
        self.failures: list[ImageFailure] = list(failures)

    @property
    def failed_image_ids(self) -> list[int | None]:
        return [failure.image_id for failure in self.failures]


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {first_line(error)}" if str(error).strip() else type(error).__name__


def _to_coco(output: dict, image_id: int, image_size, category_ids, mask_threshold: float) -> list[dict]:
    """One image's model output as COCO results; a malformed output raises so the image is reported."""
    boxes = output["boxes"].detach().float().cpu().numpy().reshape(-1, 4)
    scores = output["scores"].detach().float().cpu().numpy().reshape(-1)
    labels = output["labels"].detach().cpu().numpy().reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"model returned {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
    rles = None
    masks = output.get("masks")
    if output.get("mask_crops") is not None:  # MaskRCNN.predict(masks="crops"), thresholded already
        size = tuple(int(s) for s in output["image_size"])
        if len(output["mask_crops"]) != len(boxes) or size != tuple(image_size):
            raise ValueError(f"model returned {len(output['mask_crops'])} mask crops of a {size} image for "
                             f"{len(boxes)} boxes in a {tuple(image_size)} image")
        crops = [c.detach().cpu().numpy() for c in output["mask_crops"]]
        rles = MaskCrops(crops, output["mask_offsets"].cpu().numpy(), size).to_rle()
    elif masks is not None:
        masks = masks.detach()
        if masks.ndim == 4:
            masks = masks[:, 0]
        if masks.ndim != 3 or len(masks) != len(boxes):
            raise ValueError(f"model returned masks of shape {tuple(output['masks'].shape)} for {len(boxes)} boxes")
        if tuple(masks.shape[-2:]) != tuple(image_size):
            # COCO masks must be at the annotated image size, or IoUs are meaningless (pycocotools raises).
            raise ValueError(f"model returned {tuple(masks.shape[-2:])} masks for a {tuple(image_size)} image")
        rles = encode_rle(mask_pixels(masks, mask_threshold))
    keypoints = output.get("keypoints")
    if keypoints is not None:
        keypoints = keypoints.detach().float().cpu().numpy()
        if keypoints.ndim != 3 or keypoints.shape[2] not in (2, 3) or len(keypoints) != len(boxes):
            raise ValueError(f"model returned keypoints of shape {tuple(keypoints.shape)} for {len(boxes)} boxes, "
                             f"expected (N, K, 3)")
        if keypoints.shape[2] == 2:  # x, y only: v 1 (COCO results carry a v that OKS does not read)
            keypoints = np.concatenate([keypoints, np.ones(keypoints.shape[:2] + (1,), np.float32)], axis=2)
    return coco_results(boxes, labels, scores, rles, category_ids=category_ids,
                        fields={"image_id": int(image_id)}, exact=True, keypoints=keypoints)


def predict_dataset(model, dataset, *, category_ids, batch_size: int = 1, mask_threshold: float = 0.5,
                    device="cpu", progress: bool = True) -> PredictionResults:
    """Run `model` over `dataset` and return COCO results, surviving per-image failures.

    The model must already be on `device`; images are moved there. An nn.Module is switched to eval mode
    for the run and restored afterwards. When a batch fails, its images are retried one by one so a single
    bad image costs only itself. Each failure prints one warning line to stderr and is recorded in the
    returned `PredictionResults.failures`; the caller decides whether partial results are acceptable.
    """
    from tqdm import tqdm

    COUNT.check("batch_size", batch_size)
    PROBABILITY.check("mask_threshold", mask_threshold)
    results = PredictionResults()
    known_ids = getattr(dataset, "image_ids", None)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()

    bar = tqdm(total=len(dataset), desc="predict", unit="img", disable=not progress, file=sys.stderr)

    def fail(index: int, image_id, error: BaseException) -> None:
        failure = ImageFailure(index=index, image_id=image_id, error=_one_line(error))
        results.failures.append(failure)
        where = f"image {image_id}" if image_id is not None else f"dataset item {index}"
        bar.write(f"warning: {where}: inference failed, no detections recorded ({failure.error})", file=sys.stderr)

    def run(batch: list[tuple[int, int, torch.Tensor]]) -> None:
        try:
            images = [image.to(device) for _, _, image in batch]
            with torch.inference_mode():
                if isinstance(model, MaskRCNN):  # each mask pasted into its crop: no N x H x W floats
                    outputs = model.predict(images, masks="crops", mask_threshold=mask_threshold)
                else:
                    outputs = model(images)
            if len(outputs) != len(batch):
                raise ValueError(f"model returned {len(outputs)} outputs for {len(batch)} images")
            converted = [_to_coco(output, image_id, image.shape[-2:], category_ids, mask_threshold)
                         for (_, image_id, image), output in zip(batch, outputs)]
        except Exception as error:
            if len(batch) > 1:
                for item in batch:
                    run([item])
                return
            index, image_id, _ = batch[0]
            fail(index, image_id, error)
            return
        for image_results in converted:
            results.extend(image_results)

    try:
        batch: list[tuple[int, int, torch.Tensor]] = []
        for index in range(len(dataset)):
            image_id = int(known_ids[index]) if known_ids is not None else None
            try:
                image, target = dataset[index]
                image_id = int(target["image_id"])
            except Exception as error:
                fail(index, image_id, error)
                bar.update(1)
                continue
            batch.append((index, image_id, image))
            if len(batch) == batch_size:
                run(batch)
                bar.update(len(batch))
                batch = []
        if batch:
            run(batch)
            bar.update(len(batch))
    finally:
        bar.close()
        if was_training:
            model.train()
    return results


__all__ = ["coco_evaluate", "default_iou_types", "format_metrics_table", "predict_dataset", "write_metrics",
           "load_coco_gt", "PredictionResults", "ImageFailure", "STAT_NAMES", "KEYPOINT_STAT_NAMES"]
