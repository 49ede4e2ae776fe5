"""Predictor: every accepted input kind gives the same Detections, in the image's own pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import maskrcnn
from maskrcnn import Predictor
from maskrcnn.errors import MaskRCNNError
from maskrcnn.results import Detections
from conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def predictor(model):
    return Predictor(model, max_detections=8)


@pytest.fixture(scope="module")
def image(val_images) -> np.ndarray:
    """A real photo, shrunk so each forward pass is quick."""
    with Image.open(val_images[0]) as im:
        return np.asarray(im.convert("RGB").resize((240, 160), Image.BILINEAR)).copy()


def assert_same(a: Detections, b: Detections) -> None:
    assert len(a) == len(b) > 0
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    assert (a.masks != b.masks).mean() < 1e-3


def test_all_input_kinds_agree(predictor, image, tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(image).save(path)
    reference = predictor(image)
    assert isinstance(reference, Detections) and len(reference) > 0
    assert reference.masks.dtype == bool and reference.masks.shape[1:] == image.shape[:2]
    assert tuple(reference.image_size) == image.shape[:2]

    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    kinds = [path, Image.fromarray(image), image.astype(np.float32) / 255, chw.float() / 255,
             chw.contiguous(), rgba]
    # One batched call for all of them (same size, so no padding differences): also exercises lists.
    results = Predictor(predictor.model, max_detections=8, batch_size=len(kinds))(kinds)
    assert len(results) == len(kinds) and results[0].file_name == str(path)
    for result in results:
        assert_same(reference, result)


def test_grayscale_uint16_matches_8bit(predictor, image):
    gray = image.mean(axis=2)
    gray8 = ((gray - gray.min()) / (gray.max() - gray.min()) * 255).round().astype(np.uint8)
    gray16 = gray8.astype(np.uint16) * 257  # 255 * 257 == 65535: the same intensities at 16 bits
    assert gray16.max() > 60000
    a, b = predictor(gray8), predictor(gray16)
    assert a.masks.shape[1:] == gray16.shape
    assert_same(a, b)
    mask_like = predictor(gray8 > 128)
    assert mask_like.masks.shape[1:] == gray8.shape


def test_list_is_batched_and_keeps_order(model, image):
    flipped = np.ascontiguousarray(image[:, ::-1])
    single = Predictor(model, max_detections=8)
    batched = Predictor(model, max_detections=8, batch_size=2)
    one_by_one = [single(x) for x in (image, flipped)]
    together = batched((image, flipped))
    assert isinstance(together, list) and len(together) == 2
    for a, b in zip(one_by_one, together):
        assert len(a) == len(b)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=0.5)
    assert single([]) == []
    nchw = torch.from_numpy(np.stack([image, flipped])).permute(0, 3, 1, 2)
    assert [len(d) for d in batched(nchw)] == [len(d) for d in together]


def test_no_detections_is_empty_with_image_sized_masks(model, image):
    nothing = Predictor(model, score_thresh=1.0)(image)
    assert len(nothing) == 0
    assert nothing.boxes.shape == (0, 4) and nothing.masks.shape == (0, *image.shape[:2])
    assert nothing.to_coco() == []


def test_given_model_is_left_as_it_was(model, image):
    model.train()
    before = (model.config.score_thresh, model.config.detections_per_img)
    Predictor(model, score_thresh=0.9, max_detections=3)(image)
    assert model.training and (model.config.score_thresh, model.config.detections_per_img) == before
    model.eval()


def test_loads_checkpoint_and_respects_settings(model, image, tmp_path):
    maskrcnn.save_checkpoint(model, tmp_path / "tiny.safetensors")
    predictor = Predictor(tmp_path / "tiny.safetensors", score_thresh=0.3, max_detections=5, mask_threshold=0.7)
    dets = predictor(image)
    assert 0 < len(dets) <= 5 and (dets.scores > 0.3).all()
    assert predictor.class_names == model.class_names and dets.names[0] in model.class_names
    looser = Predictor(model, score_thresh=0.3, max_detections=5, mask_threshold=0.3)(image)
    assert looser.masks.sum() >= dets.masks.sum()  # a lower mask threshold never shrinks masks


def test_predict_files_survives_a_bad_file(predictor, image, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(image).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not really a jpeg")
    missing = tmp_path / "missing.png"
    results = list(Predictor(predictor.model, max_detections=4, batch_size=2)
                   .predict_files([good, bad, good, missing], progress=False))
    assert [p for p, _ in results] == [good, bad, good, missing]
    assert isinstance(results[0][1], Detections) and results[0][1].file_name == str(good)
    assert isinstance(results[1][1], MaskRCNNError) and "bad.jpg" in str(results[1][1])
    assert isinstance(results[2][1], Detections) and isinstance(results[3][1], MaskRCNNError)
    assert "\n" not in str(results[1][1])


def test_bad_arguments_are_user_errors(model):
    with pytest.raises(MaskRCNNError):
        Predictor(model, batch_size=0)
    with pytest.raises(MaskRCNNError):
        Predictor(model, score_thresh=1.5)
    with pytest.raises(MaskRCNNError):
        Predictor(model)(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(MaskRCNNError):
        Predictor(torch.nn.Linear(2, 2))
    with pytest.raises(MaskRCNNError, match="max_pixels"):
        Predictor(model, max_pixels=0)


def test_predict_files_refuses_too_many_pixels_and_goes_on(predictor, image, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(image).save(good)
    big = tmp_path / "big.png"
    Image.new("1", (12000, 12000)).save(big)  # 144 million pixels in a small file
    results = list(Predictor(predictor.model, max_detections=4, batch_size=2)
                   .predict_files([good, big, good], progress=False))
    assert [p for p, _ in results] == [good, big, good]
    assert isinstance(results[0][1], Detections) and isinstance(results[2][1], Detections)
    assert isinstance(results[1][1], MaskRCNNError)
    assert "big.png" in str(results[1][1]) and "144.0 million pixels" in str(results[1][1])
    small_limit = Predictor(predictor.model, max_pixels=image.shape[0] * image.shape[1] - 1)
    with pytest.raises(MaskRCNNError, match="good.png"):
        small_limit(good)
    assert len(Predictor(predictor.model, max_pixels=None, max_detections=4)(good)) > 0


@pytest.mark.parametrize("failure", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 1728000000 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_running_out_of_memory_costs_only_that_image(predictor, image, tmp_path, monkeypatch, failure):
    """A batch that fails for lack of memory is retried image by image, so only the image that does not fit
    is lost."""
    paths = []
    for name, picture in (("a.png", image), ("huge.png", image[::-1]), ("c.png", image[:, ::-1])):
        Image.fromarray(np.ascontiguousarray(picture)).save(tmp_path / name)
        paths.append(tmp_path / name)
    real_run, calls = Predictor._run, []

    def run(self, tensors, names):
        calls.append([Path(n).name for n in names])
        if any(n.endswith("huge.png") for n in names):
            raise failure
        return real_run(self, tensors, names)

    monkeypatch.setattr(Predictor, "_run", run)
    results = list(Predictor(predictor.model, max_detections=4, batch_size=2)
                   .predict_files(paths, progress=False))
    assert calls == [["a.png", "huge.png"], ["a.png"], ["huge.png"], ["c.png"]]
    assert isinstance(results[0][1], Detections) and isinstance(results[2][1], Detections)
    error = results[1][1]
    assert isinstance(error, MaskRCNNError) and "huge.png: not enough memory" in str(error)
    assert "\n" not in str(error)


def test_other_runtime_errors_are_not_hidden(predictor, image, tmp_path, monkeypatch):
    """A RuntimeError that is not about memory is a bug: it keeps its traceback instead of becoming a line."""
    Image.fromarray(image).save(tmp_path / "a.png")

    def run(self, tensors, names):
        raise RuntimeError("shape mismatch in some layer")

    monkeypatch.setattr(Predictor, "_run", run)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(Predictor(predictor.model).predict_files([tmp_path / "a.png"], progress=False))


def test_predictor_passes_its_settings_and_never_touches_the_model(model, image, monkeypatch):
    """The model's config and precision stay the same *during* a call too: the settings travel with it."""
    before = (model.config.to_dict(), model.precision)
    seen = []
    original = model.detect_boxes

    def spy(*args, **kwargs):
        seen.append((model.config.to_dict(), model.precision))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "detect_boxes", spy)
    predictor = Predictor(model, score_thresh=0.9, max_detections=3)
    predictor(image)
    assert seen == [before] and (model.config.to_dict(), model.precision) == before
    assert (predictor.settings.score_thresh, predictor.settings.detections_per_img) == (0.9, 3)
    assert predictor.settings.nms_thresh == model.config.nms_thresh and predictor.settings.precision == "fp32"


def test_two_predictors_on_one_model_from_two_threads_match_sequential(model, image):
    from concurrent.futures import ThreadPoolExecutor

    strict, loose = Predictor(model, score_thresh=1.0), Predictor(model, max_detections=8)
    flipped = np.ascontiguousarray(image[:, ::-1])
    expected = [loose(image), loose(flipped)]
    assert [len(d) for d in expected] == [8, 8]
    with ThreadPoolExecutor(max_workers=2) as pool:
        strict_runs = [pool.submit(strict, image) for _ in range(4)]
        loose_runs = [pool.submit(loose, [image, flipped]) for _ in range(4)]
        for run in strict_runs:
            assert len(run.result()) == 0
        for run in loose_runs:
            for got, want in zip(run.result(), expected):
                np.testing.assert_array_equal(got.boxes, want.boxes)
                np.testing.assert_array_equal(got.scores, want.scores)
                np.testing.assert_array_equal(got.masks, want.masks)


def test_model_predict_takes_settings_per_call(model, image):
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    default = model.predict([tensor])[0]
    top2 = model.predict([tensor], settings=model.inference_settings(detections_per_img=2))[0]
    assert len(default["scores"]) > 2 and len(top2["scores"]) == 2
    torch.testing.assert_close(top2["boxes"], default["boxes"][:2], rtol=0, atol=0)
    assert len(model.predict([tensor], settings=model.inference_settings(score_thresh=1.0))[0]["scores"]) == 0
    assert model.config.detections_per_img == 100 and model.config.score_thresh == 0.05


def test_bad_inference_settings_are_refused(model):
    from maskrcnn.modeling.settings import InferenceSettings

    with pytest.raises(ValueError, match="detections_per_img"):
        InferenceSettings(detections_per_img=0)
    with pytest.raises(MaskRCNNError, match="precision must be one of fp32, fp32-fast, bf16, fp16, got 'fp64'"):
        Predictor(model, precision="fp64")
