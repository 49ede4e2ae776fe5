"""Running exported models: ONNX files through ONNX Runtime (CPU), OpenVINO IR (.xml) through OpenVINO
(`openvino_ir.py`), TorchScript files through torch.jit.

`ExportedModel` has the call interface of `MaskRCNN` at inference (a list of (3,H,W) images in [0,1] ->
one dict of boxes, labels, scores and (N,1,H,W) mask probabilities per image) plus the attributes
`Predictor` reads, so predict's files, drawing and formats are shared with the PyTorch path. The exported
graph (see `graph.py`) starts at the normalised, padded image and ends at 28x28 masks; the steps around it
are the eager model's own (`ImageTransform` before, `postprocess.to_input_pixels`'s box rescaling and mask
pasting after).
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import MaskRCNNError
from ..modeling import postprocess
from ..modeling.keypoints import heatmaps_to_keypoints, keypoint_names
from ..modeling.model import MaskRCNN, ModelConfig
from ..modeling.settings import InferenceSettings
from ..modeling.transform import ImageTransform
from .openvino_ir import open_ir

METADATA_KEY = "maskrcnn"            # ONNX metadata_props key and TorchScript extra file name
METADATA_FORMAT = "maskrcnn.export.v1"
INPUT_NAMES = ("image", "image_size", "score_thresh", "max_detections")
OUTPUT_NAMES = ("boxes", "scores", "labels", "mask_probs")  # DetectionGraph's: the detections, then per head
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


def output_names(config: ModelConfig) -> tuple[str, ...]:
    """A model's graph outputs, in order: boxes, scores, labels, then mask_probs (K, 28, 28) with a mask
    branch and keypoint_heatmaps (K, keypoints, 56, 56) logits with a keypoint branch."""
    return OUTPUT_NAMES[:3] + ("mask_probs",) * bool(config.masks) + ("keypoint_heatmaps",) * bool(config.keypoints)


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
            self.size_divisible = int(prep["size_divisible"])
            self.transform = ImageTransform(self.min_size, self.max_size, tuple(prep["mean"]), tuple(prep["std"]),
                                            self.size_divisible).eval()
            self.mean, self.std = self.transform.mean.numpy(), self.transform.std.numpy()  # (3, 1, 1) float32
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise MaskRCNNError(f"{source}: damaged maskrcnn metadata ({e})") from None
        self.source = source
        self._run_graph = run_graph
        self.keypoint_names, self.skeleton = keypoint_names(self.config), [tuple(e) for e in self.config.skeleton]

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
            run, text = open_ir(path, METADATA_KEY, INPUT_NAMES, precision, torch.get_num_threads())
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
        """As `MaskRCNN.predict`, masks="crops" and `settings` included. The graph takes score_thresh and
        detections_per_img as inputs; its NMS threshold and fp32 arithmetic are part of the graph, so settings
        that differ there are refused."""
        settings = self._checked(settings)
        if masks not in MaskRCNN.MASK_OUTPUTS:
            raise ValueError(f"masks must be one of {MaskRCNN.MASK_OUTPUTS}, got {masks!r}")
        return [self._predict_one(image.detach().cpu().to(torch.float32), masks, mask_threshold, settings)
                for image in images]

    def _checked(self, settings: InferenceSettings | None) -> InferenceSettings:
        settings = settings or InferenceSettings.defaults_of(self)
        if settings.precision != self.precision:
            raise MaskRCNNError(f"{self.source}: exported models run in {self.precision} only, not "
                               f"{settings.precision}")
        if settings.nms_thresh != self.config.nms_thresh:
            raise MaskRCNNError(f"{self.source}: the exported graph's NMS threshold is {self.config.nms_thresh}; "
                                f"it cannot run with nms_thresh {settings.nms_thresh}")
        return settings

    def _predict_one(self, image: torch.Tensor, masks: str, mask_threshold: float | None,
                     settings: InferenceSettings) -> dict:
        """One (3, H, W) float image in [0, 1]: the eager model's resizing, the graph, then its post-processing."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise MaskRCNNError(f"expected a (3, H, W) image, got shape {tuple(image.shape)}")
        batch, size = self.preprocess(image)
        outputs = self._run_graph(batch.numpy(), np.asarray(size, dtype=np.int64),
                                  np.asarray(settings.score_thresh, dtype=np.float32),
                                  np.asarray(settings.detections_per_img, dtype=np.int64))
        det = {name: torch.from_numpy(np.asarray(out)) for name, out in zip(output_names(self.config), outputs)}
        det["labels"] = det["labels"].to(torch.int64)
        if "keypoint_heatmaps" in det:  # decoded as the eager model decodes them
            det["keypoints"], det["keypoints_scores"] = heatmaps_to_keypoints(det.pop("keypoint_heatmaps"),
                                                                              det["boxes"])
        return postprocess.to_input_pixels(det, size, (image.shape[-2], image.shape[-1]), self.config.mask_paste,
                                           masks, mask_threshold)

    def preprocess(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The eager model's ImageTransform: (3, H, W) in [0, 1] -> ((1, 3, H', W') normalised, resized,
        zero-padded batch, resized (h, w))."""
        batch, sizes, _ = self.transform([image])
        return batch, sizes[0]


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
            return session.run(None, feeds)  # every output, in the graph's order (output_names)
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
# The eager model's pastes for callers that hold numpy arrays, e.g. another runtime's outputs of the graph.

def paste_masks(masks: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int], padding: int = 1,
                mode: str = "torchvision") -> np.ndarray:
    """`postprocess.paste_masks` on numpy arrays: (N, M, M) probabilities into their boxes on (N, H, W)
    float32 canvases."""
    return postprocess.paste_masks(_tensor(masks), _tensor(boxes), image_size, padding, mode).numpy()


def paste_masks_in_crops(masks: np.ndarray, boxes: np.ndarray, image_size: tuple[int, int], padding: int = 1,
                         mode: str = "torchvision",
                         threshold: float | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """`postprocess.paste_masks_in_crops` on numpy arrays: ([(h_i, w_i) float32 crops, or bool with a
    `threshold`], (N, 2) int64 (y, x) offsets)."""
    crops, offsets = postprocess.paste_masks_in_crops(_tensor(masks), _tensor(boxes), image_size, padding, mode,
                                                      threshold)
    return [c.numpy() for c in crops], offsets.numpy()


def paste_bounds(boxes: np.ndarray, mask_size: int = 28, padding: int = 1) -> np.ndarray:
    """(N, 4) int64 x0 y0 x1 y1: the pixels (inclusive) each padded mask is resized onto in mode "torchvision"
    (`postprocess.paste_spans`). Whole pixels, so a box edge within rounding of a pixel border can land on
    either side of it."""
    x0, x1, y0, y1 = postprocess.paste_spans(_tensor(boxes).reshape(-1, 4), mask_size, padding, "torchvision")
    return torch.stack((x0, y0, x1, y1), dim=1).numpy()


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, dtype=np.float32))


__all__ = ["ExportedModel", "is_exported_file", "paste_bounds", "paste_masks", "paste_masks_in_crops"]
