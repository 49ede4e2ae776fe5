"""Exported models (ONNX through ONNX Runtime, TorchScript) give the PyTorch model's detections.

The exported graph is traced once at one size; the real images here have other sizes and aspect ratios,
so these tests also check that nothing about the trace image was frozen into the file."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

import maskrcnn
from maskrcnn import Predictor
from maskrcnn.cli import main
from maskrcnn.errors import MaskRCNNError
from maskrcnn.export import export
from maskrcnn.exported import ExportedModel, paste_bounds
from conftest import tiny_model

# pycocotools' decode trips a numpy 2 deprecation inside its own code; nothing to fix on our side.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}


@pytest.fixture(scope="module")
def model():
    """conftest.tiny_model with a mask bias, as trained models have. With the random init's zero bias, every
    position whose features the ReLU zeroed gets probability exactly 0.5, the mask threshold, so whether
    those pixels are in the mask would be decided by rounding noise in either runtime."""
    model = tiny_model()
    with torch.no_grad():
        model.mask_predictor.logits.bias.fill_(-1.0)
    return model


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("exported")
    return {fmt: export(model, folder / f"tiny{SUFFIX[fmt]}", fmt) for fmt in FORMATS}


@pytest.fixture(scope="module")
def photos(val_images) -> list[np.ndarray]:
    """Three real photos at half size, landscape and portrait (the model itself resizes to 128 px)."""
    arrays = []
    for path in val_images[:3]:
        with Image.open(path) as im:
            arrays.append(np.asarray(im.convert("RGB").resize((im.width // 2, im.height // 2), Image.BILINEAR)))
    assert len({a.shape for a in arrays}) == 3
    return arrays


def assert_same_detections(expected, actual) -> None:
    """Same detections in the same order: boxes within 0.05 px, scores within 1e-3, mask IoU >= 0.99.

    A mask is pasted onto whole pixels, so a box edge a rounding error away from a pixel border may resample
    its mask onto a grid one pixel larger (~1 detection in 5000 here). Such a mask is exempt from the IoU
    check, and only when the grids differ by that one pixel."""
    assert len(actual) == len(expected)
    assert actual.masks.shape == expected.masks.shape
    np.testing.assert_array_equal(actual.labels, expected.labels)
    np.testing.assert_allclose(actual.boxes, expected.boxes, rtol=0, atol=0.05)
    np.testing.assert_allclose(actual.scores, expected.scores, rtol=0, atol=1e-3)
    grid_a, grid_e = paste_bounds(actual.boxes), paste_bounds(expected.boxes)
    assert np.abs(grid_a - grid_e).max(initial=0) <= 1
    same_grid = np.all(grid_a == grid_e, axis=1)
    intersection = (actual.masks & expected.masks).sum(axis=(1, 2))
    union = (actual.masks | expected.masks).sum(axis=(1, 2))
    assert np.all(intersection[same_grid] >= 0.99 * union[same_grid])


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_detections_as_pytorch(fmt, model, exported, photos):
    reference = Predictor(model, score_thresh=0.05)
    runtime = Predictor(exported[fmt], score_thresh=0.05, trust_torchscript=True)
    assert isinstance(runtime.model, ExportedModel)
    for photo in photos:
        expected, actual = reference(photo), runtime(photo)
        assert len(expected) > 10
        assert actual.image_size == photo.shape[:2]
        assert_same_detections(expected, actual)
    # The limits are graph inputs, not constants of the file.
    few = Predictor(exported[fmt], score_thresh=0.5, max_detections=3, trust_torchscript=True)(photos[0])
    assert_same_detections(Predictor(model, score_thresh=0.5, max_detections=3)(photos[0]), few)


@pytest.mark.parametrize("fmt", FORMATS)
def test_image_with_no_detections(fmt, model, exported):
    gray = np.full((150, 220, 3), 128, np.uint8)
    best = Predictor(model, score_thresh=0.0)(gray).scores.max()
    threshold = min(1.0, float(best) + 1e-3)  # just above everything PyTorch finds: nothing passes
    expected = Predictor(model, score_thresh=threshold)(gray)
    actual = Predictor(exported[fmt], score_thresh=threshold, trust_torchscript=True)(gray)
    assert len(expected) == len(actual) == 0
    assert actual.masks.shape == (0, 150, 220) and actual.boxes.shape == (0, 4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_travels_in_the_file(fmt, model, exported):
    loaded = ExportedModel.load(exported[fmt], trust_torchscript=True)
    assert loaded.class_names == model.class_names and loaded.category_ids == model.category_ids
    assert (loaded.min_size, loaded.max_size, loaded.size_divisible) == (128, 192, 32)
    np.testing.assert_allclose(loaded.mean.ravel(), model.config.image_mean)
    np.testing.assert_allclose(loaded.std.ravel(), model.config.image_std)
    assert loaded.config == model.config


def test_onnx_metadata_is_readable_json(exported):
    props = {p.key: p.value for p in onnx.load(str(exported["onnx"])).metadata_props}
    meta = json.loads(props["maskrcnn"])
    assert meta["class_names"] == ["__background__", "cat", "dog", "bird"]
    assert meta["preprocessing"]["min_size"] == 128


def test_files_that_are_not_models_get_a_clear_error(val_images, tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(MaskRCNNError, match=r"notes\.onnx: not a valid ONNX model"):
        Predictor(text)
    with pytest.raises(MaskRCNNError, match="model file not found"):
        Predictor(tmp_path / "missing.onnx")

    helper = onnx.helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), foreign)
    with pytest.raises(MaskRCNNError, match=r"foreign\.onnx: an ONNX model, but not one written by"):
        Predictor(foreign)

    status, _, stderr = run_cli("predict", "--weights", text, "--out", tmp_path / "out", "--no-progress",
                                val_images[0])
    assert status == 2 and len(stderr.strip().splitlines()) == 1 and "notes.onnx" in stderr


def test_export_refuses_what_it_cannot_write(model, tmp_path):
    with pytest.raises(MaskRCNNError, match="must end in .onnx"):
        export(model, tmp_path / "model.bin", "onnx")
    with pytest.raises(MaskRCNNError, match="unknown export format"):
        export(model, tmp_path / "model.onnx", "tflite")
    assert not list(tmp_path.iterdir())


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_export_then_predict_writes_what_pytorch_writes(fmt, model, val_images, tmp_path):
    weights = tmp_path / "tiny.safetensors"
    maskrcnn.save_checkpoint(model, weights)
    exported_file = tmp_path / f"tiny{SUFFIX[fmt]}"
    status, stdout, _ = run_cli("export", "--weights", weights, "--format", fmt, "--out", exported_file)
    assert status == 0 and exported_file.is_file() and str(exported_file) in stdout

    images = val_images[:2]
    options = ["--device", "cpu", "--max-detections", "8", "--semantic", "--no-progress"]
    outputs = {}
    for name, source in (("torch", weights), (fmt, exported_file)):
        outputs[name] = tmp_path / name
        trust = ["--trust-torchscript"] if name == "torchscript" else []  # the user's opt-in to run its code
        status, _, stderr = run_cli("predict", "--weights", source, "--out", outputs[name], *options, *trust, *images)
        assert status == 0, stderr
    assert sorted(p.name for p in outputs["torch"].iterdir()) == sorted(p.name for p in outputs[fmt].iterdir())

    expected, actual = (json.loads((outputs[n] / "predictions.json").read_text()) for n in ("torch", fmt))
    assert len(actual) == len(expected) > 0
    for e, a in zip(expected, actual):
        assert (a["file_name"], a["category_id"], a["category_name"]) == (e["file_name"], e["category_id"],
                                                                          e["category_name"])
        np.testing.assert_allclose(a["bbox"], e["bbox"], rtol=0, atol=0.1)  # x, y, w, h: two box edges
        assert abs(a["score"] - e["score"]) <= 1e-3
        rles = [dict(x["segmentation"], counts=x["segmentation"]["counts"].encode()) for x in (e, a)]
        assert mask_utils.iou([rles[1]], [rles[0]], [False])[0, 0] >= 0.99


def test_split_box_head_and_exact_mask_paste_survive_export(photos, tmp_path):
    """The from-scratch recipe's options: two box heads and 4x4 box sample points in the graph, and the
    sub-pixel paste done by the numpy code around it (the file's config says which paste)."""
    model = tiny_model(box_head="split_mlp", mask_paste="exact", box_sampling_ratio=4)
    with torch.no_grad():
        model.mask_predictor.logits.bias.fill_(-1.0)
    path = export(model, tmp_path / "split.onnx", "onnx")
    runtime = Predictor(path, score_thresh=0.05)
    assert runtime.model.config.box_head == "split_mlp" and runtime.model.config.mask_paste == "exact"
    reference = Predictor(model, score_thresh=0.05)
    for photo in photos[:2]:
        expected, actual = reference(photo), runtime(photo)
        assert len(expected) > 10
        assert_same_detections(expected, actual)


def test_torchscript_runs_only_when_the_user_trusts_it(exported, val_images, tmp_path, monkeypatch):
    """A TorchScript file is a program: whatever its suffix, nothing of it runs without the opt-in."""
    disguised = tmp_path / "weights.pth"
    disguised.write_bytes(exported["torchscript"].read_bytes())
    opened = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: opened.append(a) or real_load(*a, **k))
    for source in (exported["torchscript"], disguised):
        with pytest.raises(MaskRCNNError, match=r"a TorchScript file from `maskrcnn export`.*--trust-torchscript"):
            Predictor(source)
        with pytest.raises(MaskRCNNError, match="trust_torchscript=True"):
            ExportedModel.load(source)
        with pytest.raises(MaskRCNNError, match="not a checkpoint") as refused:
            maskrcnn.load(source)  # reads weights only, never a program
        assert "weights_only" not in str(refused.value)
    status, _, stderr = run_cli("predict", "--weights", disguised, "--out", tmp_path / "out", "--no-progress",
                                "--device", "cpu", val_images[0])
    assert status == 2 and len(stderr.strip().splitlines()) == 1 and "--trust-torchscript" in stderr
    assert not opened and not (tmp_path / "out" / "predictions.json").exists()

    status, _, stderr = run_cli("predict", "--weights", disguised, "--out", tmp_path / "out", "--no-progress",
                                "--device", "cpu", "--trust-torchscript", val_images[0])
    assert status == 0, stderr
    assert len(opened) == 1 and (tmp_path / "out" / "predictions.json").is_file()


def test_no_error_text_advises_turning_off_safe_loading():
    sources = Path(maskrcnn.__file__).parent.rglob("*.py")
    assert not [str(p) for p in sources if "weights_only=False" in p.read_text()]
