"""One convolution + ReLU in torch (bf16 and fp32, channels-last) and in OpenVINO (bf16 and f32 hints, the
same layer exported to ONNX), for the shapes where our model spends most of its time: are the kernels
themselves slower than OpenVINO's? (benchmarks/README.md, "Stage by stage against OpenVINO")

    python benchmarks/conv_vs_openvino.py
"""

from __future__ import annotations

import tempfile
import time

import torch
from torch import nn

# (in channels, out channels, kernel, height, width): FPN/RPN 3x3 at P2 of an 800 x 1216 image, a 1x1
# expansion at P2, the mask head's 3x3 on 100 RoIs of 14 x 14 laid side by side
SHAPES = [(256, 256, 3, 200, 304), (64, 256, 1, 200, 304), (256, 256, 3, 14, 1400)]


def median_seconds(fn, arg, n: int = 5) -> float:
    fn(arg)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2]


def main() -> None:
    import openvino as ov

    torch.manual_seed(0)
    core = ov.Core()
    print(f"{'conv':<26}{'OV bf16':>9}{'torch bf16':>12}{'OV f32':>9}{'torch f32':>11}   (ms, median of 5)")
    for c_in, c_out, k, h, w in SHAPES:
        layer = nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2), nn.ReLU(inplace=True)).eval()  # as our model
        x = torch.randn(1, c_in, h, w)
        row = {}
        with tempfile.TemporaryDirectory() as tmp:
            torch.onnx.export(layer, (x,), f"{tmp}/conv.onnx", dynamo=False)
            for hint in ("bf16", "f32"):
                compiled = core.compile_model(f"{tmp}/conv.onnx", "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                              "INFERENCE_NUM_THREADS": torch.get_num_threads()})
                request, array = compiled.create_infer_request(), x.numpy()
                row[f"OV {hint}"] = median_seconds(request.infer, {0: array})
        with torch.no_grad():
            x_f32 = x.contiguous(memory_format=torch.channels_last)
            row["torch f32"] = median_seconds(layer, x_f32)
            bf16_layer, x_bf16 = layer.to(torch.bfloat16), x_f32.to(torch.bfloat16)
            row["torch bf16"] = median_seconds(bf16_layer, x_bf16)
        name = f"{c_in}->{c_out} {k}x{k} at {h}x{w}"
        print(f"{name:<26}" + "".join(f"{1e3 * row[key]:>{width}.1f}" for key, width in
                                     (("OV bf16", 9), ("torch bf16", 12), ("OV f32", 9), ("torch f32", 11))))


if __name__ == "__main__":
    main()
