"""OpenVINO IR files: writing them (through OpenVINO's own converter, from our ONNX graph) and running them.

`maskrcnn export --format openvino --out model.xml` writes `model.xml` + `model.bin`; the metadata that
`runtime.ExportedModel` needs (class names, preprocessing, config) travels in the IR's rt_info under the
same key as in ONNX files. Running an IR gives the same `run_graph` function as ONNX Runtime does, so the
pre- and post-processing around the graph (resize, paste, Detections) is the one in `runtime.py`.

OpenVINO picks its arithmetic per CPU: on CPUs with native bf16 (AVX512-BF16, AMX) its default is bf16.
We compile with an explicit INFERENCE_PRECISION_HINT instead: "fp32" (f32, the default, within the parity
tolerance of the eager model) or "bf16" (what OpenVINO would choose there by itself), so what runs is
always the precision the caller asked for, never the machine's choice.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import MaskRCNNError, first_line
from ..files import remove_stale_temps, temp_path

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16"}
OPENVINO_DEFAULT = "openvino-default"  # no hint: OpenVINO's own choice for this CPU (benchmarks compare it)


def _openvino():
    try:
        import openvino
    except ImportError:
        raise MaskRCNNError("OpenVINO files need the openvino package: pip install 'maskrcnn[openvino]'") from None
    return openvino


def write_ir(write_onnx, path: Path, meta: dict, metadata_key: str) -> None:
    """`write_onnx(onnx_path)` writes the graph as ONNX; it is converted to IR at `path` (.xml) and its
    weights file beside it (.bin). The .bin is moved into place first and the .xml last, so a complete
    .xml never points at a half-written .bin. The files are staged in a folder named as `files.temp_path`
    names temporary files, so a killed export's leftovers are removed by the next one into that folder."""
    ov = _openvino()
    remove_stale_temps(path.parent)
    folder = temp_path(path)
    folder.mkdir()
    try:
        onnx_path = folder / "graph.onnx"
        write_onnx(str(onnx_path))
        model = ov.convert_model(str(onnx_path))
        model.set_rt_info(json.dumps(meta), [metadata_key])
        staged = folder / "model.xml"
        ov.save_model(model, str(staged), compress_to_fp16=False)
        bin_tmp = temp_path(path.with_suffix(".bin"))
        os.replace(staged.with_suffix(".bin"), bin_tmp)
        os.replace(bin_tmp, path.with_suffix(".bin"))
        os.replace(staged, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def open_ir(path: Path, metadata_key: str, input_names, precision: str = "fp32", threads: int = 1):
    """(run_graph, metadata text) for an IR written by `write_ir`, compiled for the CPU at `precision`;
    run_graph returns every output of the graph, in its order (as ONNX Runtime's session.run(None, ...))."""
    if precision not in PRECISION_HINTS and precision != OPENVINO_DEFAULT:
        raise MaskRCNNError(f"{path}: OpenVINO models run in {' or '.join(PRECISION_HINTS)}, not {precision}")
    ov = _openvino()
    if not path.with_suffix(".bin").is_file():
        raise MaskRCNNError(f"{path}: its weights file {path.with_suffix('.bin').name} is missing beside it")
    core = ov.Core()
    try:
        model = core.read_model(str(path))
    except Exception as e:  # OpenVINO raises its own exception types for unreadable files
        raise MaskRCNNError(f"{path}: not a valid OpenVINO model ({first_line(e)})") from None
    if not model.has_rt_info([metadata_key]) or [i.get_any_name() for i in model.inputs] != list(input_names):
        raise MaskRCNNError(f"{path}: an OpenVINO model, but not one written by `maskrcnn export`")
    text = model.get_rt_info([metadata_key]).astype(str)
    config = {"INFERENCE_NUM_THREADS": max(1, threads), "PERFORMANCE_HINT": "LATENCY"}
    if precision in PRECISION_HINTS:
        config["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS[precision]
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    outputs = list(compiled.outputs)

    def run(image, image_size, score_thresh, max_detections):
        try:
            result = request.infer(dict(zip(input_names, (image, image_size, score_thresh, max_detections))))
        except Exception as e:
            raise MaskRCNNError(f"{path}: the exported model failed on this image ({first_line(e)[:300]})") from None
        return [result[o].copy() for o in outputs]

    return run, text
