"""Where one image's inference time goes: torch.profiler over our model's predict (the random-weight
torchvision-layout ResNet-50-FPN of reference.py, COCO val photos), ops by self time and by input shape,
and the convolutions' achieved GFLOP/s per shape. With --compile-features also the backbone + FPN run
eagerly vs through torch.compile (inductor with freezing), alternating, and the compile time.

    python benchmarks/profile_inference.py [--precision bf16] [--images 3] [--compile-features]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.cpu_inference import DEFAULT_IMAGES, read_rgb  # noqa: E402
from benchmarks.reference import torchvision_reference  # noqa: E402
import maskrcnn  # noqa: E402
from maskrcnn.modeling.plan import inference_plan  # noqa: E402


def conv_rates(prof) -> list[tuple[str, int, float, float]]:
    """(input shapes, calls, ms per call, GFLOP/s) of every convolution shape, slowest in total first."""
    rows = []
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key != "aten::mkldnn_convolution" or not event.input_shapes:
            continue
        x, w = event.input_shapes[0], event.input_shapes[1]
        n, _, h, width = x
        out_c, in_c, kh, kw = w
        flops = 2 * n * out_c * in_c * kh * kw * h * width  # as if stride 1 (the shapes do not say)
        per_call = event.self_cpu_time_total / event.count / 1e3  # ms
        rows.append((f"{x} x {w}", event.count, per_call, flops / (per_call / 1e3) / 1e9))
    return sorted(rows, key=lambda r: -r[1] * r[2])


def compare_compiled_features(model, image: torch.Tensor, precision: str) -> None:
    import torch._inductor.config as inductor

    inductor.freezing = True
    batch, _, _ = model.transform([image])
    plan = inference_plan(precision)
    batch = batch.contiguous(memory_format=torch.channels_last) if plan.channels_last else batch
    # the folded-weight cache is invisible to dynamo: fold through autograd (constants after freezing)
    traced = dataclasses.replace(plan, norms="autograd")
    compiled = torch.compile(lambda x: model.features(x, traced), dynamic=False)

    def run(fn) -> float:
        with torch.no_grad(), model._autocast(batch.device, precision):
            start = time.perf_counter()
            fn(batch)
            return time.perf_counter() - start

    print(f"compiling backbone + FPN for a {tuple(batch.shape)} batch: {run(compiled):.1f} s")
    eager, fused = [], []
    for _ in range(4):
        eager.append(run(lambda x: model.features(x, plan)))
        fused.append(run(compiled))
    print(f"backbone + FPN, median of 4: eager {sorted(eager)[2]:.3f} s, compiled {sorted(fused)[2]:.3f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--precision", default="bf16", choices=("fp32", "fp32-fast", "bf16"))
    p.add_argument("--images", type=int, default=3, help="COCO val images (default 3)")
    p.add_argument("--image-dir", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--compile-features", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(torchvision_reference().state_dict(), Path(tmp) / "m.pth")
        model = maskrcnn.load(Path(tmp) / "m.pth").eval()
    images = [read_rgb(path) for path in sorted(args.image_dir.glob("*.jpg"))[:args.images]]
    settings = model.inference_settings(precision=args.precision)
    for image in images:  # warm-up
        model.predict([image], settings=settings)
    start = time.perf_counter()
    for image in images:
        model.predict([image], settings=settings)
    print(f"{args.precision}: {(time.perf_counter() - start) / len(images):.3f} s per image, "
          f"{torch.get_num_threads()} threads")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for image in images:
            model.predict([image], settings=settings)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40))
    print("convolutions by shape: calls, ms per call, GFLOP/s (FLOPs as if stride 1: stride-2 convs read 4x high)")
    for shapes, calls, ms, rate in conv_rates(prof)[:20]:
        print(f"  {shapes:70s} {calls:4d} {ms:8.1f} {rate:7.0f}")
    if args.compile_features:
        compare_compiled_features(model, images[0], args.precision)


if __name__ == "__main__":
    main()
