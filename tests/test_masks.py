"""Compact masks (box-local crops) give bit for bit what full image-sized masks give, for memory that follows
the objects: the pasted values, boxes, scores, RLEs, maps and pictures, on real COCO images."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import maskrcnn
from maskrcnn.export.runtime import paste_masks as paste_masks_numpy
from maskrcnn.export.runtime import paste_masks_in_crops as paste_masks_in_crops_numpy
from maskrcnn.masks import MaskCrops
from maskrcnn.modeling.postprocess import paste_masks, paste_masks_in_crops
from maskrcnn.results import Detections, encode_rle
from maskrcnn.viz import paint_order

from conftest import read_rgb, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _canvases(crops, offsets, shape, dtype):
    out = np.zeros(shape, dtype=dtype)
    for i, (crop, (top, left)) in enumerate(zip(crops, np.asarray(offsets).tolist())):
        crop = np.asarray(crop)
        out[i, top:top + crop.shape[0], left:left + crop.shape[1]] = crop
    return out


def _random_boxes(rng, n, height, width):
    """Boxes of every size, some partly or wholly outside the image, some thinner than a pixel."""
    centres = rng.random((n, 2)) * [width, height] * 1.3 - 0.15 * np.array([width, height])
    sizes = rng.random((n, 2)) ** 3 * [width, height] + 0.01
    return np.concatenate([centres - sizes / 2, centres + sizes / 2], 1).astype(np.float32)


@pytest.mark.parametrize("mode", ["torchvision", "exact"])
def test_pasting_into_crops_gives_the_full_paste_bit_for_bit(mode):
    rng = np.random.default_rng(0)
    for height, width in [(37, 500), (480, 640), (333, 29)]:
        boxes = _random_boxes(rng, 40, height, width)
        masks = rng.random((40, 28, 28)).astype(np.float32)
        full = paste_masks(torch.from_numpy(masks), torch.from_numpy(boxes), (height, width), mode=mode).numpy()
        crops, offsets = paste_masks_in_crops(torch.from_numpy(masks), torch.from_numpy(boxes), (height, width),
                                              mode=mode)
        assert sum(c.numel() for c in crops) < full.size  # the crops are smaller than the canvases
        assert np.array_equal(_canvases(crops, offsets, full.shape, np.float32), full)
        for threshold in (0.5, 0.0):
            crops, offsets = paste_masks_in_crops(torch.from_numpy(masks), torch.from_numpy(boxes),
                                                  (height, width), mode=mode, threshold=threshold)
            assert np.array_equal(_canvases(crops, offsets, full.shape, bool), full >= threshold)
        # the numpy paste of exported models, likewise
        full = paste_masks_numpy(masks, boxes, (height, width), mode=mode)
        crops, offsets = paste_masks_in_crops_numpy(masks, boxes, (height, width), mode=mode)
        assert np.array_equal(_canvases(crops, offsets, full.shape, np.float32), full)
        crops, offsets = paste_masks_in_crops_numpy(masks, boxes, (height, width), mode=mode, threshold=0.5)
        assert np.array_equal(_canvases(crops, offsets, full.shape, bool), full >= 0.5)


def _assert_same_detections(compact: Detections, full: Detections, image: np.ndarray) -> None:
    np.testing.assert_array_equal(compact.boxes, full.boxes)
    np.testing.assert_array_equal(compact.scores, full.scores)
    np.testing.assert_array_equal(compact.labels, full.labels)
    np.testing.assert_array_equal(compact.masks, full.masks)
    assert compact.to_coco(image_id=3) == full.to_coco(image_id=3)
    np.testing.assert_array_equal(compact.semantic_map(), full.semantic_map())
    np.testing.assert_array_equal(compact.instance_map(), full.instance_map())
    np.testing.assert_array_equal(compact.draw(image), full.draw(image))
    np.testing.assert_array_equal(compact.draw(image, color_by="class"), full.draw(image, color_by="class"))


@pytest.mark.parametrize("mode", ["torchvision", "exact"])
def test_predictor_compact_path_equals_the_full_paste_on_coco_images(val_images, one_thread, mode):
    """The Predictor's crops against the model's default full-image output, thresholded as before."""
    model = tiny_model(mask_paste=mode)
    predictor = maskrcnn.Predictor(model, score_thresh=0.05)
    checked = 0
    for path in val_images[:3]:
        image = np.asarray(Image.open(path).convert("RGB"))
        compact = predictor(path)
        model.config.score_thresh = 0.05
        with torch.inference_mode():
            output = model([read_rgb(path)])[0]
            crops_output = model.predict([read_rgb(path)], masks="crops")[0]
        model.config.score_thresh = tiny_model().config.score_thresh
        assert np.array_equal(_canvases(crops_output["mask_crops"], crops_output["mask_offsets"],
                                        output["masks"][:, 0].shape, np.float32), output["masks"][:, 0].numpy())
        full = Detections.from_model_output(output, model.class_names, model.category_ids, file_name=str(path))
        assert len(compact) == len(full) > 10
        assert compact.mask_crops.crop_area() < compact.masks.size / 4
        _assert_same_detections(compact, full, image)
        for threshold in (0.0, 0.9):
            strict = Detections.from_model_output(crops_output, model.class_names, mask_threshold=threshold)
            np.testing.assert_array_equal(
                strict.masks, Detections.from_model_output(output, model.class_names, mask_threshold=threshold).masks)
        checked += 1
    assert checked == 3


def _old_topmost(masks, scores):
    """How the maps resolved overlaps on full masks before crops: paint in paint_order, last one wins."""
    owner = np.full(masks.shape[1:], -1, dtype=np.int32)
    for i in paint_order(scores):
        owner[masks[i]] = i
    return owner


def test_detections_from_full_masks_and_from_crops_agree():
    rng = np.random.default_rng(1)
    height, width, n = 61, 83, 12
    full = np.zeros((n, height, width), dtype=bool)
    crops, offsets = [], []
    for i in range(n):
        top, left = int(rng.integers(0, height - 5)), int(rng.integers(0, width - 5))
        h, w = int(rng.integers(1, height - top)), int(rng.integers(1, width - left))
        crop = rng.random((h, w)) < 0.4
        crop[:, 0] = False  # loose crops (an empty column) are cut down to their pixels
        if i == 3:
            crop[:] = False  # an empty mask
        full[i, top:top + h, left:left + w] = crop
        crops.append(crop)
        offsets.append((top, left))
    boxes = rng.random((n, 4)).astype(np.float32) * 50
    boxes[:, 2:] += boxes[:, :2]
    scores = np.round(rng.random(n), 1).astype(np.float32)  # ties too
    labels = rng.integers(1, 4, n)
    names = ["__background__", "cat", "dog", "bird"]
    from_full = Detections(boxes, labels, scores, full, names, category_ids=[0, 17, 18, 16])
    from_crops = Detections(boxes, labels, scores, MaskCrops(crops, offsets, (height, width)), names,
                            category_ids=[0, 17, 18, 16])
    image = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    _assert_same_detections(from_crops, from_full, image)
    np.testing.assert_array_equal(from_crops.masks, full)
    assert [e["segmentation"]["counts"] for e in from_crops.to_coco()] == [r["counts"] for r in encode_rle(full)]
    np.testing.assert_array_equal(from_crops.instance_map(), _old_topmost(full, scores) + 1)
    assert from_crops.mask_crops.crops[3].shape == (0, 0)
    for index in (slice(2, 9), np.array([5, 0, 3]), scores >= 0.5, 4, -1):
        part = from_crops[index]
        np.testing.assert_array_equal(part.masks, full[np.atleast_1d(np.arange(n)[index])])
        np.testing.assert_array_equal(part.semantic_map(), from_full[index].semantic_map())
    np.testing.assert_array_equal(from_crops.mask(-1), full[-1])
    assert from_crops.filter(0.5).counts() == from_full.filter(0.5).counts()
    with pytest.raises(ValueError, match="outside"):
        MaskCrops([np.ones((3, 3), dtype=bool)], [(60, 0)], (height, width))
    replaced = from_full[:2]
    replaced.masks = full[5:7]  # the old dataclass field could be assigned; the property still can
    np.testing.assert_array_equal(replaced.masks, full[5:7])
    with pytest.raises(ValueError, match="expected 2 masks"):
        replaced.masks = full[:3]


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from PIL import Image
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, sys.argv[1] + "/tests")
    from conftest import tiny_model
    import maskrcnn

    torch.set_num_threads(1)
    image = np.asarray(Image.open(sys.argv[2]).convert("RGB").resize((4000, 3000), Image.BILINEAR))
    predictor = maskrcnn.Predictor(tiny_model(), score_thresh=0.0,
                                   max_detections=100)
    def rss():
        return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
    before = rss()
    dets = predictor(image)
    dets.to_coco(), dets.semantic_map(), dets.instance_map()
    # VmHWM, not getrusage ru_maxrss: after exec, ru_maxrss keeps the parent pytest process's peak.
    peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    print(json.dumps({"before": before, "peak": peak, "n": len(dets), "crop_area": dets.mask_crops.crop_area()}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_follows_the_objects_not_image_size_times_detections(val_images):
    """A 4000x3000 image with 100 detections: N x H x W is 1.2 GB as bools (4.8 GB as the float
    probabilities the full paste makes); predicting, encoding and the maps stay far below it."""
    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(ROOT), str(val_images[0])],
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["n"] == 100
    n_h_w = 100 * 4000 * 3000
    assert result["crop_area"] < n_h_w / 5
    assert result["peak"] - result["before"] < n_h_w / 2, result


@pytest.mark.parametrize("mode", ["torchvision", "exact"])
def test_evaluation_encodes_from_crops_what_it_encoded_from_full_masks(val_images, one_thread, mode):
    """predict_dataset asks our model for thresholded crops; the COCO results (RLEs included) are those of
    the full (N, 1, H, W) output it used to threshold with `p >= mask_threshold` (the rule predict shares)."""
    from maskrcnn.engine.evaluate import predict_dataset

    class Images:
        image_ids = (1, 2, 3)

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return read_rgb(val_images[i]), {"image_id": i + 1}

    class FullOutput(torch.nn.Module):  # not a MaskRCNN: called as it is, so it pastes full masks
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, images):
            return self.model(images)

    model = tiny_model(mask_paste=mode)
    model.config.score_thresh = 0.05
    for threshold in (0.5, 0.0):
        compact = predict_dataset(model, Images(), category_ids=model.category_ids, mask_threshold=threshold,
                                  progress=False)
        full = predict_dataset(FullOutput(model), Images(), category_ids=model.category_ids,
                               mask_threshold=threshold, progress=False)
        assert len(compact) > 30 and not compact.failures
        assert list(compact) == list(full)
