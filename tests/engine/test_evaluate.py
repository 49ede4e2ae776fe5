"""COCO evaluation on real COCO annotations (pycocotools called directly as the reference), and
predict_dataset end to end with fake models on a tiny synthetic dataset."""

from __future__ import annotations

import copy
import io
import json
import contextlib

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import coco_mini
from maskrcnn.engine.evaluate import (PredictionResults, coco_evaluate, format_metrics_table, predict_dataset,
                                      write_metrics)
from maskrcnn.errors import MaskRCNNError
from maskrcnn.results import encode_rle

# pycocotools trips a numpy-2 DeprecationWarning inside its mask code.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


# ----------------------------------------------------------------------------------------- real COCO


@pytest.fixture(scope="module")
def gt_path():
    return coco_mini() / "annotations" / "instances_val2017.json"


@pytest.fixture(scope="module")
def gt(gt_path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(gt_path))


def _rle_of(coco: COCO, annotation: dict) -> dict:
    rle = coco.annToRLE(annotation)
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}


@pytest.fixture(scope="module")
def perfect(gt):
    """The ground truth itself as detections: every metric must be exactly 1."""
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0,
             "segmentation": _rle_of(gt, a)}
            for a in gt.dataset["annotations"] if not a["iscrowd"]]


@pytest.fixture(scope="module")
def noisy(gt):
    """Imperfect detections (jittered, shifted, missing, false positives) so the metrics are non-trivial."""
    rng = np.random.default_rng(0)
    results = []
    category_ids = gt.getCatIds()
    for a in gt.dataset["annotations"]:
        if a["iscrowd"] or rng.random() < 0.2:
            continue
        x, y, w, h = a["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        mask = gt.annToMask(a).astype(bool)
        mask = np.roll(mask, tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
        results.append({"image_id": a["image_id"], "category_id": a["category_id"],
                        "bbox": [float(v) for v in (x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3])],
                        "score": float(rng.random()), "segmentation": encode_rle(mask[None])[0]})
    for image_id in gt.getImgIds():
        info = gt.imgs[image_id]
        for _ in range(3):
            x0, y0 = rng.integers(0, info["width"] - 50), rng.integers(0, info["height"] - 50)
            w, h = rng.integers(5, 50, 2)
            mask = np.zeros((info["height"], info["width"]), dtype=bool)
            mask[y0:y0 + h, x0:x0 + w] = True
            results.append({"image_id": image_id, "category_id": int(rng.choice(category_ids)),
                            "bbox": [float(x0), float(y0), float(w), float(h)], "score": float(rng.random() * 0.5),
                            "segmentation": encode_rle(mask[None])[0]})
    return results


def _direct(gt: COCO, results: list[dict], iou_type: str, cat_ids=None, sigmas=None) -> np.ndarray:
    """COCOeval used the plain documented way; for segm the box is left out so area comes from the mask.
    `sigmas`: the keypoints' OKS sigmas where they are not COCO's persons'."""
    anns = copy.deepcopy(results)
    if iou_type == "segm":
        for ann in anns:
            ann.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(anns)
        coco_eval = COCOeval(gt, dt, iou_type)
        if cat_ids is not None:
            coco_eval.params.catIds = cat_ids
        if sigmas is not None:
            coco_eval.params.kpt_oks_sigmas = sigmas
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


def test_ground_truth_as_detections_scores_one(gt, perfect):
    metrics = coco_evaluate(gt, perfect, verbose=False)
    for iou_type in ("bbox", "segm"):
        assert set(metrics[iou_type]) == set(STATS)
        for name in STATS:
            assert isinstance(metrics[iou_type][name], float)
            assert metrics[iou_type][name] == pytest.approx(1.0, abs=1e-6), (iou_type, name)
        assert all(v == pytest.approx(1.0, abs=1e-6) for v in metrics["per_class"][iou_type].values())


def test_matches_pycocotools_directly(gt, noisy):
    metrics = coco_evaluate(gt, noisy, verbose=False)
    for iou_type in ("bbox", "segm"):
        expected = _direct(gt, noisy, iou_type)[:6]
        got = [metrics[iou_type][name] for name in STATS]
        assert got == pytest.approx(expected.tolist(), abs=1e-9), iou_type
        assert 0.05 < metrics[iou_type]["AP"] < 0.95  # genuinely between the extremes


def test_per_class_ap_matches_single_category_evaluation(gt, noisy):
    metrics = coco_evaluate(gt, noisy, iou_types=("segm",), verbose=False)
    per_class = metrics["per_class"]["segm"]
    with_gt = {gt.cats[a["category_id"]]["name"] for a in gt.dataset["annotations"]}
    # Categories with no ground truth have no defined AP and are left out.
    assert set(per_class) == with_gt
    assert len(with_gt) < len(gt.cats)
    for name in ("person", "car", "dog"):
        category_id = gt.getCatIds(catNms=[name])[0]
        assert per_class[name] == pytest.approx(_direct(gt, noisy, "segm", [category_id])[0], abs=1e-9), name


def test_shifted_boxes_score_zero_and_segmentation_is_optional(gt, perfect):
    shifted = [{k: v for k, v in r.items() if k != "segmentation"} for r in perfect]
    for r in shifted:
        r["bbox"] = [r["bbox"][0] + 10000, r["bbox"][1] + 10000, *r["bbox"][2:]]
    metrics = coco_evaluate(gt, shifted, iou_types=("bbox",), verbose=False)
    assert "segm" not in metrics
    assert metrics["bbox"]["AP"] == 0.0 and metrics["bbox"]["AP50"] == 0.0


def test_dropping_half_of_the_detections_lowers_ap(gt, perfect):
    metrics = coco_evaluate(gt, perfect[::2], verbose=False)
    for iou_type in ("bbox", "segm"):
        assert 0.2 < metrics[iou_type]["AP"] < 0.8, iou_type


def test_empty_results_give_zeros(gt_path):
    metrics = coco_evaluate(gt_path, [], verbose=False)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type] == {name: 0.0 for name in STATS}
        assert metrics["per_class"][iou_type] and set(metrics["per_class"][iou_type].values()) == {0.0}


def test_images_without_detections_count_as_misses(gt, perfect):
    first_image = perfect[0]["image_id"]
    only_one_image = [r for r in perfect if r["image_id"] == first_image]
    metrics = coco_evaluate(gt, only_one_image, iou_types=("bbox",), verbose=False)
    assert metrics["bbox"]["AP"] < 0.2


def test_callers_results_are_not_modified(gt, perfect):
    results = copy.deepcopy(perfect[:50])
    before = copy.deepcopy(results)
    coco_evaluate(gt, results, verbose=False)
    assert results == before


def test_verbose_prints_the_pycocotools_summary_and_quiet_prints_nothing(gt_path, perfect, capsys):
    coco_evaluate(gt_path, perfect[:20], verbose=False)
    assert capsys.readouterr().out == ""
    coco_evaluate(gt_path, perfect[:20], verbose=True)
    out = capsys.readouterr().out
    assert "IoU metric: bbox" in out and "IoU metric: segm" in out
    assert out.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]") == 2


def test_bad_results_give_clear_errors(gt, perfect):
    with pytest.raises(MaskRCNNError, match="not in the ground truth"):
        coco_evaluate(gt, [dict(perfect[0], image_id=-5)], verbose=False)
    with pytest.raises(MaskRCNNError, match="segmentation"):
        coco_evaluate(gt, [{k: v for k, v in perfect[0].items() if k != "segmentation"}], verbose=False)
    with pytest.raises(MaskRCNNError, match="not found"):
        coco_evaluate("/nonexistent/instances.json", perfect, verbose=False)


# --------------------------------------------------------------------------------- table and json file


def test_format_metrics_table_shows_percent_values():
    metrics = {"bbox": dict(zip(STATS, (0.3791, 0.5923, 0.4112, 0.2134, 0.4123, -1.0))),
               "segm": dict(zip(STATS, (0.3456, 0.5612, 0.3678, 0.1567, 0.3789, 0.5012))),
               "per_class": {}}
    table = format_metrics_table(metrics)
    lines = table.splitlines()
    assert len(lines) == 3
    assert lines[0].split() == list(STATS)
    assert lines[1].split() == ["bbox", "37.9", "59.2", "41.1", "21.3", "41.2", "-"]
    assert lines[2].split() == ["segm", "34.6", "56.1", "36.8", "15.7", "37.9", "50.1"]
    assert format_metrics_table({"bbox": metrics["bbox"]}).splitlines()[1].startswith("bbox")
    assert "segm" not in format_metrics_table({"bbox": metrics["bbox"]})


def test_write_metrics_is_atomic_json(tmp_path):
    path = tmp_path / "run" / "metrics.json"
    metrics = {"bbox": {"AP": 0.5, "AP50": np.float64(0.75)}, "per_class": {"bbox": {"cat": float("nan")}}}
    write_metrics(path, metrics)
    write_metrics(path, metrics)  # overwrite in place
    assert json.loads(path.read_text()) == {"bbox": {"AP": 0.5, "AP50": 0.75}, "per_class": {"bbox": {"cat": None}}}
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left behind


# ------------------------------------------------------------------------------------- predict_dataset

CATEGORY_IDS = [0, 7, 3]  # model label -> COCO category id, deliberately not the identity


def _make_synthetic(count: int = 5):
    """Images whose pixel (0,0) encodes the image id, with squares (label 1) and discs (label 2)."""
    rng = np.random.default_rng(1)
    items, images, annotations = [], [], []
    for index in range(count):
        image_id = 100 + index
        height, width = 40 + 6 * index, 60
        masks, labels = [], []
        for k in range(2 + index % 2):
            label = 1 + k % 2
            cy, cx = rng.integers(10, height - 10), rng.integers(10, width - 10)
            r = int(rng.integers(4, 9))
            yy, xx = np.mgrid[:height, :width]
            if label == 1:
                mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
            else:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            masks.append(mask)
            labels.append(label)
        masks = np.stack(masks)
        boxes = []
        for mask in masks:
            ys, xs = np.nonzero(mask)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        boxes = np.array(boxes, dtype=np.float32)
        for mask, box, label, rle in zip(masks, boxes, labels, encode_rle(masks)):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORY_IDS[label],
                                "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                                "area": float(mask.sum()), "iscrowd": 0, "segmentation": rle})
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
        image = torch.rand(3, height, width)
        image[:, 0, 0] = image_id / 1000
        items.append((image, {"image_id": image_id, "boxes": torch.from_numpy(boxes),
                              "labels": torch.tensor(labels), "masks": torch.from_numpy(masks)}))
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 7, "name": "square"}, {"id": 3, "name": "disc"}]}
    return items, coco


class _ListDataset:
    def __init__(self, items, broken_index=None):
        self.items = items
        self.broken_index = broken_index
        self.image_ids = [target["image_id"] for _, target in items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        if index == self.broken_index:
            raise OSError("image file is truncated\nsecond line of detail")
        return self.items[index]


class _OracleModel(torch.nn.Module):
    """Returns each image's ground truth as its detections (masks as probabilities, not 0/1)."""

    def __init__(self, items, fail_on=None):
        super().__init__()
        self.truth = {target["image_id"]: target for _, target in items}
        self.fail_on = fail_on
        self.batch_sizes = []

    def forward(self, images):
        assert not self.training, "predict_dataset must run the model in eval mode"
        assert not torch.is_grad_enabled()
        self.batch_sizes.append(len(images))
        outputs = []
        for image in images:
            image_id = int(round(float(image[0, 0, 0]) * 1000))
            if image_id == self.fail_on:
                raise RuntimeError(f"boom on {image_id}")
            target = self.truth[image_id]
            n = len(target["labels"])
            outputs.append({"boxes": target["boxes"].clone(), "labels": target["labels"].clone(),
                            "scores": torch.linspace(0.9, 0.5, n),
                            "masks": target["masks"][:, None].float() * 0.7 + 0.2})
        return outputs


@pytest.fixture()
def synthetic(tmp_path):
    items, coco = _make_synthetic()
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return items, path


def test_predict_dataset_with_oracle_model_scores_one(synthetic, capsys):
    items, gt_json = synthetic
    model = _OracleModel(items)
    results = predict_dataset(model, _ListDataset(items), category_ids=CATEGORY_IDS, batch_size=2, progress=False)
    assert isinstance(results, PredictionResults) and isinstance(results, list)
    assert results.failures == [] and results.failed_image_ids == []
    assert model.batch_sizes == [2, 2, 1]
    assert model.training  # mode restored
    assert len(results) == sum(len(t["labels"]) for _, t in items)
    assert {r["category_id"] for r in results} == {7, 3}
    assert isinstance(results[0]["segmentation"]["counts"], str)
    json.dumps(results)  # JSON-ready as is

    metrics = coco_evaluate(gt_json, results, verbose=False)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0, abs=1e-6), iou_type
    assert metrics["per_class"]["segm"] == pytest.approx({"square": 1.0, "disc": 1.0})
    assert "100.0" in format_metrics_table(metrics)
    assert capsys.readouterr().err == ""


def test_predict_dataset_applies_mask_threshold(synthetic):
    items, gt_json = synthetic
    # Probabilities are 0.9 inside and 0.2 outside: a threshold above 0.9 leaves every mask empty.
    results = predict_dataset(_OracleModel(items), _ListDataset(items), category_ids=CATEGORY_IDS,
                              mask_threshold=0.95, progress=False)
    metrics = coco_evaluate(gt_json, results, verbose=False)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["segm"]["AP"] == 0.0


def test_one_failing_image_does_not_lose_the_others(synthetic, capsys):
    items, gt_json = synthetic
    model = _OracleModel(items, fail_on=102)
    results = predict_dataset(model, _ListDataset(items), category_ids=CATEGORY_IDS, batch_size=2, progress=False)
    assert results.failed_image_ids == [102]
    assert results.failures[0].index == 2 and "RuntimeError: boom on 102" in results.failures[0].error
    # Image 103 shared the failing batch and was retried on its own.
    assert sorted({r["image_id"] for r in results}) == [100, 101, 103, 104]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image 102" in err[0] and "boom on 102" in err[0]
    metrics = coco_evaluate(gt_json, results, verbose=False)
    assert 0.5 < metrics["segm"]["AP"] < 1.0  # the failed image counts as missed, not skipped


def test_unreadable_dataset_item_is_reported_by_image_id(synthetic, capsys):
    items, _ = synthetic
    results = predict_dataset(_OracleModel(items), _ListDataset(items, broken_index=0),
                              category_ids=CATEGORY_IDS, batch_size=3, progress=False)
    assert results.failed_image_ids == [100]
    assert results.failures[0].error == "OSError: image file is truncated"  # one line
    assert sorted({r["image_id"] for r in results}) == [101, 102, 103, 104]
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
