"""Detections: subsets, overlap resolution in the per-pixel maps, COCO export and the PNG writers."""

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.results import Detections, encode_rle, save_instance_png, save_semantic_png
from maskrcnn.viz import class_color

NAMES = ["__background__", "cat", "dog", "bird"]


def square(top, left, size, shape=(10, 10)):
    mask = np.zeros(shape, dtype=bool)
    mask[top:top + size, left:left + size] = True
    return mask


def two_squares(first_score, second_score):
    """A cat square (rows/cols 0-5) and a dog square (rows/cols 3-8) overlapping on rows/cols 3-5."""
    masks = np.stack([square(0, 0, 6), square(3, 3, 6)])
    return Detections(boxes=np.array([[0, 0, 6, 6], [3, 3, 9, 9]], dtype=np.float32),
                      labels=np.array([1, 2]), scores=np.array([first_score, second_score], dtype=np.float32),
                      masks=masks, class_names=NAMES)


def make(labels, scores, shape=(8, 8)):
    n = len(labels)
    return Detections(boxes=np.tile(np.array([[1, 1, 4, 4]], dtype=np.float32), (n, 1)), labels=np.array(labels),
                      scores=np.array(scores, dtype=np.float32), masks=np.zeros((n, *shape), dtype=bool),
                      class_names=NAMES)


def test_fields_are_coerced_to_the_documented_dtypes():
    dets = make([1, 2], [0.9, 0.4])
    assert dets.boxes.dtype == np.float32 and dets.labels.dtype == np.int64
    assert dets.scores.dtype == np.float32 and dets.masks.dtype == bool
    assert dets.image_size == (8, 8)
    assert len(dets) == 2
    assert dets.names == ["cat", "dog"]


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError):
        Detections(boxes=np.zeros((2, 4)), labels=np.array([1]), scores=np.array([0.5, 0.4]),
                   masks=np.zeros((2, 5, 5), dtype=bool), class_names=NAMES)


def test_semantic_map_overlap_goes_to_higher_score_even_when_it_comes_second():
    semantic = two_squares(0.6, 0.9).semantic_map()
    expected = np.zeros((10, 10), dtype=np.uint8)
    expected[0:6, 0:6] = 1
    expected[3:9, 3:9] = 2  # the dog scores higher, so it owns the overlap
    assert semantic.dtype == np.uint8
    np.testing.assert_array_equal(semantic, expected)


def test_semantic_map_overlap_goes_to_higher_score_when_it_comes_first():
    semantic = two_squares(0.9, 0.6).semantic_map()
    expected = np.zeros((10, 10), dtype=np.uint8)
    expected[3:9, 3:9] = 2
    expected[0:6, 0:6] = 1  # now the cat scores higher
    np.testing.assert_array_equal(semantic, expected)


def test_semantic_map_is_16_bit_when_class_ids_do_not_fit_a_byte():
    names = ["__background__"] + [f"c{i}" for i in range(1, 300)]
    dets = Detections(boxes=np.zeros((1, 4)), labels=np.array([280]), scores=np.array([0.5]),
                      masks=square(1, 1, 2, (4, 4))[None], class_names=names)
    semantic = dets.semantic_map()
    assert semantic.dtype == np.uint16
    assert semantic[1, 1] == 280 and semantic[0, 0] == 0


def test_instance_map_numbers_detections_from_one_and_higher_score_wins():
    instances = two_squares(0.6, 0.9).instance_map()
    expected = np.zeros((10, 10), dtype=np.uint16)
    expected[0:6, 0:6] = 1
    expected[3:9, 3:9] = 2
    assert instances.dtype == np.uint16
    np.testing.assert_array_equal(instances, expected)

    instances = two_squares(0.9, 0.6).instance_map()
    assert instances[4, 4] == 1 and instances[8, 8] == 2 and instances[0, 0] == 1 and instances[9, 9] == 0


def test_counts_per_class_most_frequent_first():
    counts = make([2, 1, 2, 3, 2], [0.9, 0.8, 0.7, 0.6, 0.5]).counts()
    assert counts == {"dog": 3, "cat": 1, "bird": 1}
    assert next(iter(counts)) == "dog"
    assert make([], []).counts() == {}


def test_filter_keeps_scores_at_or_above_the_threshold():
    kept = make([1, 2, 3], [0.9, 0.5, 0.3]).filter(0.5)
    assert kept.labels.tolist() == [1, 2]
    np.testing.assert_allclose(kept.scores, [0.9, 0.5])
    assert kept.class_names == NAMES and kept.image_size == (8, 8)


def test_indexing_returns_detections():
    dets = two_squares(0.9, 0.6)
    one = dets[1]
    assert isinstance(one, Detections) and len(one) == 1
    assert one.labels.tolist() == [2]
    np.testing.assert_array_equal(one.masks[0], square(3, 3, 6))
    assert dets[-1].labels.tolist() == [2]
    assert dets[np.array([False, True])].labels.tolist() == [2]
    assert dets[:1].labels.tolist() == [1]
    assert len(dets[[]]) == 0
    with pytest.raises(IndexError):
        dets[2]


def test_from_model_output_thresholds_masks_and_sorts_by_score():
    probabilities = torch.zeros(2, 1, 4, 5)
    probabilities[0, 0, 1, 1] = 0.7
    probabilities[1, 0, 2, 3] = 0.95
    output = {"boxes": torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 4.0, 3.0]]),
              "labels": torch.tensor([1, 3]), "scores": torch.tensor([0.4, 0.8]), "masks": probabilities}
    dets = Detections.from_model_output(output, NAMES, category_ids=[0, 17, 18, 16], file_name="a.jpg")
    assert dets.labels.tolist() == [3, 1]  # re-sorted: 0.8 first
    np.testing.assert_allclose(dets.scores, [0.8, 0.4])
    np.testing.assert_allclose(dets.boxes[0], [1.0, 1.0, 4.0, 3.0])
    assert dets.masks.shape == (2, 4, 5) and dets.masks.dtype == bool
    assert dets.masks[0].sum() == 1 and dets.masks[0, 2, 3]
    assert dets.masks[1].sum() == 1 and dets.masks[1, 1, 1]
    assert dets.image_size == (4, 5) and dets.file_name == "a.jpg"

    strict = Detections.from_model_output(output, NAMES, mask_threshold=0.8)
    assert strict.masks[0, 2, 3] and not strict.masks[1].any()  # 0.7 < 0.8


def test_from_model_output_with_no_detections():
    output = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "scores": torch.zeros(0), "masks": torch.zeros(0, 1, 6, 7)}
    dets = Detections.from_model_output(output, NAMES)
    assert len(dets) == 0 and dets.image_size == (6, 7)
    np.testing.assert_array_equal(dets.semantic_map(), np.zeros((6, 7), dtype=np.uint8))
    assert dets.to_coco(image_id=3) == []


def test_to_coco_entries():
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:12, 8:20] = True
    mask[20:25, 30:33] = True
    dets = Detections(boxes=np.array([[8.0, 5.0, 33.0, 25.0]]), labels=np.array([2]), scores=np.array([0.93]),
                      masks=mask[None], class_names=NAMES, category_ids=[0, 17, 18, 16], file_name="x.jpg")
    (entry,) = dets.to_coco(image_id=42)
    assert entry["image_id"] == 42 and entry["file_name"] == "x.jpg"
    assert entry["category_id"] == 18 and entry["category_name"] == "dog"
    assert entry["bbox"] == [8.0, 5.0, 25.0, 20.0]
    assert entry["score"] == 0.93
    assert all(type(v) is float for v in entry["bbox"]) and type(entry["score"]) is float
    assert type(entry["category_id"]) is int and isinstance(entry["segmentation"]["counts"], str)
    rle = {"size": entry["segmentation"]["size"], "counts": entry["segmentation"]["counts"].encode("ascii")}
    np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), mask)
    assert json.loads(json.dumps(dets.to_coco(image_id=42))) == [entry]


def test_to_coco_without_image_id_or_category_map_uses_label():
    dets = make([3], [0.5])
    (entry,) = dets.to_coco()
    assert "image_id" not in entry and "file_name" not in entry
    assert entry["category_id"] == 3 and entry["category_name"] == "bird"


def test_encode_rle_round_trip():
    masks = np.stack([square(0, 0, 3, (6, 6)), square(2, 1, 4, (6, 6))])
    rles = encode_rle(masks)
    assert len(rles) == 2 and all(isinstance(r["counts"], str) for r in rles)
    decoded = mask_utils.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1).astype(bool), masks)


def test_instance_png_reads_back_exactly(tmp_path):
    instances = np.array([[0, 1, 2], [300, 4096, 65535]], dtype=np.uint16)
    path = tmp_path / "instances.png"
    save_instance_png(path, instances)
    with Image.open(path) as picture:
        via_pil = np.array(picture)
    np.testing.assert_array_equal(via_pil, instances)
    via_cv2 = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert via_cv2.dtype == np.uint16
    np.testing.assert_array_equal(via_cv2, instances)


def test_semantic_png_is_a_palette_image_with_the_class_colours(tmp_path):
    semantic = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    path = tmp_path / "semantic.png"
    save_semantic_png(path, semantic, NAMES)
    with Image.open(path) as picture:
        assert picture.mode == "P"
        np.testing.assert_array_equal(np.array(picture), semantic)  # values stay class ids
        assert json.loads(picture.text["classes"]) == NAMES
        rgb = np.array(picture.convert("RGB"))
    assert tuple(rgb[0, 0]) == (0, 0, 0)
    assert tuple(rgb[0, 1]) == class_color(1)
    assert tuple(rgb[1, 0]) == class_color(2)
    assert tuple(rgb[1, 1]) == class_color(3)


def test_semantic_png_rejects_ids_above_255(tmp_path):
    with pytest.raises(ValueError):
        save_semantic_png(tmp_path / "s.png", np.array([[0, 300]], dtype=np.uint16), NAMES)


def test_repr_is_a_summary_not_the_arrays():
    text = repr(make([2, 2, 1], [0.9, 0.8, 0.1], shape=(200, 300)))
    assert "2 dog" in text and "1 cat" in text and "300x200" in text
    assert len(text) < 200


def test_draw_returns_a_picture_of_the_image_size():
    dets = two_squares(0.6, 0.9)
    picture = dets.draw(np.full((10, 10, 3), 100, dtype=np.uint8), show_legend=False)
    assert picture.shape == (10, 10, 3) and picture.dtype == np.uint8
    assert not np.array_equal(picture[4, 4], [100, 100, 100])
