"""Export a model to ONNX, TorchScript or OpenVINO IR.

Both formats hold the same graph, `DetectionGraph`: from one normalised image, zero-padded to a multiple of
32, to its detections and their 28x28 mask probabilities. Resizing before it and pasting masks after it
are left to `maskrcnn.export.runtime`: the resize factor is Python arithmetic on the image size, which a trace
would freeze, and unpasted masks let other runtimes paste only what they need. The class names and
every preprocessing setting travel inside the file (ONNX metadata_props / a TorchScript extra file), so an
exported file is all `maskrcnn predict` needs. OpenVINO IR is converted from the ONNX graph by OpenVINO's own
converter (`openvino_ir.py`).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch

from ..errors import MaskRCNNError
from ..files import atomic_path
from ..modeling.model import MaskRCNN
from .graph import DetectionGraph
from .openvino_ir import write_ir
from .runtime import INPUT_NAMES, METADATA_FORMAT, METADATA_KEY, output_names

FORMATS = ("onnx", "torchscript", "openvino")
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml"}  # how predict recognises the file; TorchScript: any
ONNX_OPSET = 17  # >= 16: RoiAlign with an explicit coordinate transformation mode


def metadata(model: MaskRCNN) -> dict:
    """What a runtime needs besides the graph: class names and ids, the preprocessing, default settings."""
    t = model.transform
    return {
        "format": METADATA_FORMAT,
        "class_names": list(model.class_names),
        "category_ids": [int(i) for i in model.category_ids],
        "preprocessing": {"min_size": t.min_size[-1], "max_size": t.max_size, "mean": t.mean.flatten().tolist(),
                          "std": t.std.flatten().tolist(), "size_divisible": t.size_divisible},
        "config": model.config.to_dict(),
    }


def example_inputs(model: MaskRCNN, height: int = 320, width: int = 416) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with. Any values do: the graph has no data-dependent branches."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand((1, 3, height, width), generator=generator)
    settings = model.inference_settings()  # the graph inputs ExportedModel feeds from its InferenceSettings
    return (image, torch.tensor([height, width]), torch.tensor(settings.score_thresh, dtype=torch.float32),
            torch.tensor(settings.detections_per_img))


def export(model: MaskRCNN, path: str | os.PathLike, fmt: str = "onnx") -> Path:
    """Write `model` as an ONNX, TorchScript or OpenVINO IR file (written atomically) and return its path."""
    if fmt not in FORMATS:
        raise MaskRCNNError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if model.precision != "fp32":
        raise MaskRCNNError(f"export needs an fp32 model, got precision {model.precision!r}")
    path = Path(path)
    if fmt in SUFFIXES and path.suffix.lower() != SUFFIXES[fmt]:
        raise MaskRCNNError(f"{path}: an {fmt} file must end in {SUFFIXES[fmt]} (that is how predict recognises it)")
    if next(model.parameters()).device.type != "cpu" or model.training:
        model = copy.deepcopy(model).cpu().eval()  # leave the caller's model where and as it was
    graph = DetectionGraph(model).eval()
    if fmt == "openvino":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_ir(lambda onnx_path: _export_onnx(graph, onnx_path, metadata(model)), path, metadata(model),
                     METADATA_KEY)
        return path
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter deprecation chatter, nothing actionable
        if fmt == "onnx":
            _export_onnx(graph, str(tmp), metadata(model))
        else:
            _export_torchscript(graph, str(tmp), metadata(model))
    return path


def _export_onnx(graph: DetectionGraph, path: str, meta: dict) -> None:
    try:
        import onnx
    except ImportError:
        raise MaskRCNNError("ONNX export needs the onnx package: pip install 'maskrcnn[export]'") from None
    names = list(output_names(graph.model.config))
    dynamic = {"image": {2: "height", 3: "width"}, **{name: {0: "detections"} for name in names}}
    # The TorchScript-based exporter: it maps torchvision's nms and roi_align to ONNX's NonMaxSuppression
    # and RoiAlign, which the torch.export-based one does not.
    torch.onnx.export(graph, example_inputs(graph.model), path, dynamo=False, opset_version=ONNX_OPSET,
                      input_names=list(INPUT_NAMES), output_names=names, dynamic_axes=dynamic)
    proto = onnx.load(path)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
    onnx.save(proto, path)


def _export_torchscript(graph: DetectionGraph, path: str, meta: dict) -> None:
    traced = torch.jit.trace(graph, example_inputs(graph.model), check_trace=False)
    torch.jit.save(traced, path, _extra_files={METADATA_KEY: json.dumps(meta)})


__all__ = ["export", "DetectionGraph", "FORMATS", "metadata"]
