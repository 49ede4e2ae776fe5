"""Running exported models: ONNX files through ONNX Runtime (CPU), OpenVINO IR (.xml) through OpenVINO
(`openvino_ir.py`), TorchScript files through torch.jit.

`ExportedModel` has the call interface of `MaskRCNN` at inference (a list of (3,H,W) images in [0,1] ->
one dict of boxes, labels, scores and (N,1,H,W) mask probabilities per image) plus the attributes
`Predictor` reads, so predict's files, drawing and formats are shared with the PyTorch path. The exported
graph (see `graph.py`) starts at the normalised, padded image and ends at 28x28 masks; the steps
around it are done here in numpy with the same arithmetic as `ImageTransform` and `paste_masks`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import MaskRCNNError
from ..modeling.model import ModelConfig
from ..modeling.settings import InferenceSettings
from .openvino_ir import open_ir
from ..modeling.postprocess import MASK_PASTE_MODES, crop_bounds, cut_crops

METADATA_KEY = "maskrcnn"            # ONNX metadata_props key and TorchScript extra file name
METADATA_FORMAT = "maskrcnn.export.v1"
INPUT_NAMES = ("image", "image_size", "score_thresh", "max_detections")
OUTPUT_NAMES = ("boxes", "scores", "labels", "mask_probs")
UNTRUSTED_TORCHSCRIPT = (
    "{path}: a TorchScript file from `maskrcnn export`; TorchScript is a program that runs its own code when "
    "loaded, so it runs only on request: add --trust-torchscript (Predictor(..., trust_torchscript=True)) if you "
    "made this file or trust where it came from, or use the checkpoint or an .onnx export instead")


def is_exported_file(source) -> bool:
    """An .onnx path, or a TorchScript archive written by `maskrcnn export` (whatever its suffix)."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source)
    return path.suffix.lower() in (".onnx", ".xml") or (path.is_file() and _torchscript_metadata_entry(path) is not None)


def _torchscript_metadata_entry(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            return next((n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_KEY}")), None)
    except (zipfile.BadZipFile, OSError):
        return None


class ExportedModel:
    """An exported Mask R-CNN on the CPU, one image per graph call; fp32 (OpenVINO files: also bf16)."""

    training = False
    precision = "fp32"

    def __init__(self, run_graph, meta: dict, source: str):
        """`run_graph(image, image_size, score_thresh, max_detections)` -> (boxes, scores, labels, mask_probs)
        as numpy arrays; `meta` is the metadata `maskrcnn export` wrote."""
        try:
            if meta.get("format") != METADATA_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {METADATA_FORMAT!r}")
            self.config = ModelConfig.from_dict(meta["config"])
            self.class_names = list(meta["class_names"])
            self.category_ids = [int(i) for i in meta["category_ids"]]
            prep = meta["preprocessing"]
            self.min_size, self.max_size = int(prep["min_size"]), int(prep["max_size"])
            self.mean = np.asarray(prep["mean"], dtype=np.float32).reshape(3, 1, 1)
            self.std = np.asarray(prep["std"], dtype=np.float32).reshape(3, 1, 1)
            self.size_divisible = int(prep["size_divisible"])
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise MaskRCNNError(f"{source}: damaged maskrcnn metadata ({e})") from None
        self.source = source
        self._run_graph = run_graph

    @classmethod
    def load(cls, path: str | os.PathLike, trust_torchscript: bool = False,
             precision: str = "fp32") -> "ExportedModel":
        """An .onnx file (run by ONNX Runtime), an OpenVINO .xml (its .bin beside it) or a TorchScript file from
        `maskrcnn export`. TorchScript is a program whose code runs when it is loaded, so it is loaded only
        with `trust_torchscript=True`. `precision`: "fp32"; OpenVINO files also "bf16"."""
        path = Path(path)
        if not path.is_file():
            raise MaskRCNNError(f"{path}: model file not found")
        if path.suffix.lower() == ".xml":
            run, text = open_ir(path, METADATA_KEY, INPUT_NAMES, OUTPUT_NAMES, precision, torch.get_num_threads())
            model = cls(run, _parse_metadata(text, path), str(path))
            model.precision = precision
            return model
        if precision != "fp32":
            raise MaskRCNNError(f"{path}: exported models run in fp32 only (OpenVINO files also bf16), not {precision}")
        if path.suffix.lower() == ".onnx":
            return cls(*_open_onnx(path), str(path))
        if _torchscript_metadata_entry(path) is None:  # read from the zip's index: nothing of it runs
            raise MaskRCNNError(f"{path}: not a model written by `maskrcnn export` (neither .onnx nor a "
                                "TorchScript file with maskrcnn metadata)")
        if not trust_torchscript:
            raise MaskRCNNError(UNTRUSTED_TORCHSCRIPT.format(path=path))
        return cls(*_open_torchscript(path), str(path))

    # The parts of the nn.Module interface that Predictor uses.
    def eval(self) -> "ExportedModel":
        return self

    def train(self, mode: bool = True) -> "ExportedModel":
        if mode:
            raise MaskRCNNError(f"{self.source}: an exported model can only predict, not train")
        return self

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return self.predict(images)

    def predict(self, images: list[torch.Tensor], masks: str = "image",
                mask_threshold: float | None = None, settings: InferenceSettings | None = None) -> list[dict]:
        """As `MaskRCNN.predict`, masks="crops" and `settings` included (its arrays as tensors, the crops a
        list). The graph takes score_thresh and detections_per_img as inputs; its NMS threshold and fp32
        arithmetic are part of the graph, so settings that differ there are refused."""
        settings = self._checked(settings)
        outputs = [self.detect(image.detach().cpu().numpy(), masks, mask_threshold, settings) for image in images]
        return [{k: [torch.from_numpy(c) for c in v] if isinstance(v, list) else torch.as_tensor(v)
                 for k, v in out.items()} for out in outputs]

    def _checked(self, settings: InferenceSettings | None) -> InferenceSettings:
        settings = settings or InferenceSettings.defaults_of(self)
        if settings.precision != self.precision:
            raise MaskRCNNError(f"{self.source}: exported models run in {self.precision} only, not "
                               f"{settings.precision}")
        if settings.nms_thresh != self.config.nms_thresh:
            raise MaskRCNNError(f"{self.source}: the exported graph's NMS threshold is {self.config.nms_thresh}; "
                                f"it cannot run with nms_thresh {settings.nms_thresh}")
        return settings

    def detect(self, image: np.ndarray, masks: str = "image", mask_threshold: float | None = None,
               settings: InferenceSettings | None = None) -> dict[str, np.ndarray]:
        """One (3, H, W) float image in [0, 1] -> boxes, labels, scores, masks (N, 1, H, W) in its pixels;
        masks="crops": mask_crops, mask_offsets and image_size instead of masks (see `MaskRCNN.predict`);
        `settings` None: the model's defaults."""
        settings = self._checked(settings)
        if masks not in ("image", "crops"):
            raise ValueError(f"masks must be 'image' or 'crops', got {masks!r}")
        if image.ndim != 3 or image.shape[0] != 3:
            raise MaskRCNNError(f"expected a (3, H, W) image, got shape {image.shape}")
        height, width = image.shape[-2:]
        batch, size = self.preprocess(image)
        boxes, scores, labels, mask_probs = self._run_graph(
            batch, np.asarray(size, dtype=np.int64), np.asarray(settings.score_thresh, dtype=np.float32),
            np.asarray(settings.detections_per_img, dtype=np.int64))
        boxes = rescale_boxes(boxes, size, (height, width))
        out = {"boxes": boxes, "labels": labels.astype(np.int64), "scores": scores}
        if masks == "crops":
            crops, offsets = paste_masks_in_crops(mask_probs, boxes, (height, width), mode=self.config.mask_paste,
                                                  threshold=mask_threshold)
            return {**out, "mask_crops": crops, "mask_offsets": offsets, "image_size": np.array([height, width])}
        return {**out, "masks": paste_masks(mask_probs, boxes, (height, width), mode=self.config.mask_paste)[:, None]}

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """ImageTransform in numpy: normalise, resize, zero-pad -> ((1, 3, H', W') batch, resized (h, w))."""
        image = (image.astype(np.float32, copy=False) - self.mean) / self.std
        h, w = image.shape[-2:]
        scale = min(float(self.min_size) / min(h, w), float(self.max_size) / max(h, w))
        resized = resize_bilinear(image, int(h * scale), int(w * scale))
        d = self.size_divisible
        out_h, out_w = resized.shape[-2:]
        batch = np.zeros((1, 3, math.ceil(out_h / d) * d, math.ceil(out_w / d) * d), dtype=np.float32)
        batch[0, :, :out_h, :out_w] = resized
        return batch, (out_h, out_w)


def _open_onnx(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise MaskRCNNError("running ONNX models needs onnxruntime: pip install 'maskrcnn[export]'") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same thread budget as the PyTorch path
    options.inter_op_num_threads = 1
    options.log_severity_level = 4  # fatal only: a failed run is reported as one MaskRCNNError line
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MaskRCNNError(f"{path}: not a valid ONNX model ({first})") from None
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None or [i.name for i in session.get_inputs()] != list(INPUT_NAMES):
        raise MaskRCNNError(f"{path}: an ONNX model, but not one written by `maskrcnn export`")

    def run(image, image_size, score_thresh, max_detections):
        feeds = dict(zip(INPUT_NAMES, (image, image_size, score_thresh, max_detections)))
        try:
            return session.run(list(OUTPUT_NAMES), feeds)
        except Exception as e:  # onnxruntime's own exception types
            raise _graph_failure(path, e) from None

    return run, _parse_metadata(text, path)


def _open_torchscript(path: Path):
    import torchvision  # noqa: F401  (registers torchvision::nms and roi_align, which the graph calls)

    extra = {METADATA_KEY: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MaskRCNNError(f"{path}: not a loadable TorchScript model ({first})") from None

    def run(image, image_size, score_thresh, max_detections):
        try:
            with torch.inference_mode():
                outputs = module(*(torch.from_numpy(np.asarray(a)) for a in
                                   (image, image_size, score_thresh, max_detections)))
        except RuntimeError as e:  # what TorchScript raises for an op that fails inside the graph
            raise _graph_failure(path, e, last_line=True) from None
        return [o.numpy() for o in outputs]

    return run, _parse_metadata(extra[METADATA_KEY], path)


def _graph_failure(path: Path, error: Exception, last_line: bool = False) -> MaskRCNNError:
    """One line naming the file for an exported graph that failed while running. ONNX Runtime puts its
    message on the first line; TorchScript puts it on the last, after the graph's call stack."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    detail = lines[-1] if last_line else lines[0]
    return MaskRCNNError(f"{path}: the exported model failed on this image ({detail[:300]})")


def _parse_metadata(text, path: Path) -> dict:
    try:
        meta = json.loads(text)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, TypeError) as e:
        raise MaskRCNNError(f"{path}: damaged maskrcnn metadata ({e})") from None
    return meta


# ---------------------------------------------------------------------------------------------- numpy

def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of bilinear resizing along one axis, as PyTorch computes them for
    align_corners=False: position (i + 0.5) * in/out - 0.5 clamped at 0, with the float32 scale. PyTorch's
    CPU kernels evaluate the position as one fused multiply-add (a single rounding to float32), which
    float64 arithmetic rounded once reproduces; two float32 roundings shift weights by up to 1e-4."""
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    src = np.maximum(scale * (np.arange(out_size) + 0.5) - 0.5, 0).astype(np.float32)
    low = np.minimum(src.astype(np.int64), in_size - 1)
    high = np.where(low < in_size - 1, low + 1, low)
    frac = np.clip(src - low.astype(np.float32), 0, 1).astype(np.float32)
    return low, high, frac


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) float32 -> (C, height, width); F.interpolate(mode="bilinear", align_corners=False)."""
    low, high, frac = _linear_taps(image.shape[-2], height)
    f = frac[:, None]
    rows = image[:, low, :] * (1 - f) + image[:, high, :] * f
    low, high, frac = _linear_taps(image.shape[-1], width)
    return rows[:, :, low] * (1 - frac) + rows[:, :, high] * frac


def rescale_boxes(boxes: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """Boxes from the resized image's pixels back to the input's (float32, as transform.rescale_boxes)."""
    ratio_h = np.float32(to_size[0]) / np.float32(from_size[0])
    ratio_w = np.float32(to_size[1]) / np.float32(from_size[1])
    return (boxes.reshape(-1, 4) * np.array([ratio_w, ratio_h, ratio_w, ratio_h], dtype=np.float32))


def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int], padding: int = 1,
                mode: str = "torchvision") -> np.ndarray:
    """postprocess.paste_masks in numpy: (N, M, M) probabilities into their boxes on (N, H, W) canvases."""
    if mode not in MASK_PASTE_MODES:
        raise ValueError(f"unknown mask paste mode {mode!r}; choose one of {MASK_PASTE_MODES}")
    n, m = masks.shape[0], masks.shape[-1]
    height, width = image_size
    if n == 0:
        return np.zeros((0, height, width), dtype=np.float32)
    padded = np.pad(masks.astype(np.float32, copy=False), ((0, 0), (padding, padding), (padding, padding)))
    if mode == "exact":
        x0, grown_w, y0, grown_h = _exact_spans(boxes, m, padding)
        rows = _exact_resize_matrix(y0, grown_h, m + 2 * padding, height)
        cols = _exact_resize_matrix(x0, grown_w, m + 2 * padding, width)
        return rows @ padded @ cols.transpose(0, 2, 1)
    x0, y0, x1, y1 = paste_bounds(boxes, m, padding).T
    rows = _resize_matrix(y0, y1, m + 2 * padding, height)
    cols = _resize_matrix(x0, x1, m + 2 * padding, width)
    return rows @ padded @ cols.transpose(0, 2, 1)


def paste_masks_in_crops(masks: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int], padding: int = 1,
                         mode: str = "torchvision",
                         threshold: float | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """postprocess.paste_masks_in_crops in numpy: per mask, the part of its canvas that can be non-zero, as
    ([(h_i, w_i) float32 crops, or bool with a `threshold`], (N, 2) int64 (y, x) offsets), pasting one
    canvas at a time with the same arithmetic as `paste_masks` (so the values are the same bit for bit)."""
    if mode not in MASK_PASTE_MODES:
        raise ValueError(f"unknown mask paste mode {mode!r}; choose one of {MASK_PASTE_MODES}")
    height, width = image_size
    if len(masks) == 0:
        return [], np.zeros((0, 2), dtype=np.int64)
    m = masks.shape[-1]
    if mode == "exact":
        x0, grown_w, y0, grown_h = _exact_spans(boxes, m, padding)
        bounds = crop_bounds(y0, grown_h, height, True), crop_bounds(x0, grown_w, width, True)
    else:
        x0, y0, x1, y1 = paste_bounds(boxes, m, padding).T
        bounds = crop_bounds(y0, y1, height, False), crop_bounds(x0, x1, width, False)
    crops, offsets = cut_crops(lambda i: paste_masks(masks[i:i + 1], boxes[i:i + 1], image_size, padding, mode)[0],
                               bounds, image_size, threshold,
                               lambda shape, as_bool: np.zeros(shape, dtype=bool if as_bool else np.float32))
    return crops, np.array(offsets, dtype=np.int64).reshape(-1, 2)


def _exact_spans(boxes: np.ndarray, m: int, padding: int) -> tuple[np.ndarray, ...]:
    """x start, x length, y start, y length of each padded mask in mode "exact" (postprocess._paste_spans)."""
    scale = np.float32((m + 2 * padding) / m)
    grown_w = np.maximum(boxes[:, 2] - boxes[:, 0], np.float32(1e-3)) * scale
    grown_h = np.maximum(boxes[:, 3] - boxes[:, 1], np.float32(1e-3)) * scale
    x0 = (boxes[:, 2] + boxes[:, 0]) * np.float32(0.5) + np.float32(0.5) - grown_w * np.float32(0.5)
    y0 = (boxes[:, 3] + boxes[:, 1]) * np.float32(0.5) + np.float32(0.5) - grown_h * np.float32(0.5)
    return x0, grown_w, y0, grown_h


def _exact_resize_matrix(start: np.ndarray, length: np.ndarray, in_size: int, canvas: int) -> np.ndarray:
    """postprocess._exact_resize_matrix in numpy."""
    pos = np.arange(canvas, dtype=np.float32) + np.float32(0.5)
    src = np.clip((pos[None, :] - start[:, None]) / length[:, None] * np.float32(in_size) - np.float32(0.5),
                  0, in_size - 1).astype(np.float32)
    low = np.floor(src).astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    frac = src - low.astype(np.float32)
    taps = np.arange(in_size)
    return (((taps == low[..., None]) * (1 - frac)[..., None])
            + ((taps == high[..., None]) * frac[..., None])).astype(np.float32)


def paste_bounds(boxes: np.ndarray, mask_size: int = 28, padding: int = 1) -> np.ndarray:
    """(N, 4) int64 x0 y0 x1 y1: the pixels (inclusive) each padded mask is resized onto. Whole pixels, so a
    box edge within rounding of a pixel border can land on either side of it (in PyTorch as well)."""
    scale = np.float32((mask_size + 2 * padding) / mask_size)
    half = np.float32(0.5)
    half_w = (boxes[:, 2] - boxes[:, 0]) * half * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * half * scale
    cx = (boxes[:, 2] + boxes[:, 0]) * half
    cy = (boxes[:, 3] + boxes[:, 1]) * half
    return np.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), axis=1).astype(np.int64)


def _resize_matrix(start: np.ndarray, end: np.ndarray, in_size: int, canvas: int) -> np.ndarray:
    """(N, canvas, in_size) weights resizing a length-`in_size` signal onto pixels start..end (inclusive)."""
    out_size = np.maximum(end - start + 1, 1)
    pos = np.arange(canvas)
    local = pos[None, :] - start[:, None]
    inside = ((pos[None, :] >= np.maximum(start, 0)[:, None]) & (pos[None, :] <= end[:, None])).astype(np.float32)
    step = np.float32(in_size) / out_size.astype(np.float32)
    src = np.maximum((local.astype(np.float32) + np.float32(0.5)) * step[:, None] - np.float32(0.5), np.float32(0))
    low = np.minimum(src.astype(np.int64), in_size - 1)
    frac = np.clip(src - low.astype(np.float32), 0, 1)
    high = np.where(low < in_size - 1, low + 1, low)
    taps = np.arange(in_size)
    return (((taps == low[..., None]) * ((1 - frac) * inside)[..., None])
            + ((taps == high[..., None]) * (frac * inside)[..., None])).astype(np.float32)


__all__ = ["ExportedModel", "is_exported_file", "paste_bounds", "paste_masks", "paste_masks_in_crops",
           "resize_bilinear", "rescale_boxes"]
