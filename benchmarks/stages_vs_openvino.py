"""Where our bf16 path and OpenVINO (default settings, our export of the same weights) spend an image's time,
stage by stage, and each path's seconds per image measured in blocks.

    python benchmarks/stages_vs_openvino.py [--num-images 6] [--precision bf16]

Stages: ours from forward hooks on the model's modules (wall clock around each); OpenVINO from its own
per-node counters (PERF_COUNT), grouped by the module its node names carry (`/backbone/layer1.0/...`);
nodes the exporter left unnamed (RoIAlign, the mask predictor's transposed conv, sigmoid, ...) are summed
as "unnamed graph nodes", and "outside" is the wall time not in any stage (ours: the transform, the FPN
levels converted to fp32 for the poolers, box selection, pasting; OpenVINO: its host-side pre- and post-processing,
less the amount by which its per-node counters add up to more than its wall time: it can come out
negative, and then compares nothing).

Timing runs each path over all images in a block, blocks alternating between paths, median of three: a
path interleaved image by image with another one finds glibc's malloc trimmed by the other and
page-faults its feature maps back in (7-8% of our time; OpenVINO has its own memory pool), which is not
how either runs in `predict` or `serve`."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import maskrcnn
from benchmarks.cpu_inference import DEFAULT_IMAGES, openvino_runners, read_rgb
from benchmarks.reference import torchvision_reference

OUR_STAGES = ("backbone", "fpn", "rpn", "box_pooler", "box_head", "box_predictor", "mask_pooler", "mask_head",
              "mask_predictor")


def hook_stages(model) -> dict[str, float]:
    """Seconds per stage of the model's last call, filled in by forward hooks."""
    spent, started = {}, {}
    for name in OUR_STAGES:
        module = model.get_submodule(name)
        module.register_forward_pre_hook(lambda m, i, name=name: started.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(lambda m, i, o, name=name: spent.__setitem__(name, time.perf_counter() - started[name]))
    return spent


def openvino_stages(xml: Path, images: list[torch.Tensor]) -> list[dict]:
    """Per image: seconds per module group from OpenVINO's own counters, plus the wall time."""
    import openvino as ov

    from maskrcnn.export.runtime import (
        INPUT_NAMES,
        METADATA_KEY,
        ExportedModel,
        _parse_metadata,
    )

    core = ov.Core()
    model = core.read_model(str(xml))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                                 "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True})
    request, outputs = compiled.create_infer_request(), list(compiled.outputs)

    def run(*inputs):
        result = request.infer(dict(zip(INPUT_NAMES, inputs)))
        return [result[o].copy() for o in outputs]

    runner = ExportedModel(run, _parse_metadata(model.get_rt_info([METADATA_KEY]).astype(str), xml), str(xml))
    runner([images[0]])
    rows = []
    for image in images:
        start = time.perf_counter()
        runner([image])
        row = {"wall": time.perf_counter() - start}
        for node in request.get_profiling_info():
            parts = node.node_name.split("/")
            group = parts[1] if len(parts) > 2 and parts[1] in OUR_STAGES else "unnamed graph nodes"
            row[group] = row.get(group, 0.0) + node.real_time.total_seconds()
        rows.append(row)
    return rows


def blocks(runners: dict, images: list[torch.Tensor], rounds: int = 3) -> dict[str, float]:
    """Median over `rounds` of each path's seconds per image over all images, paths alternating by block."""
    spent = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            run([images[0]])  # settle this path's memory after the other one ran
            start = time.perf_counter()
            for image in images:
                run([image])
            spent[name].append((time.perf_counter() - start) / len(images))
    return {name: statistics.median(ts) for name, ts in spent.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=6)
    p.add_argument("--image-dir", type=Path, default=DEFAULT_IMAGES)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32-fast"))
    args = p.parse_args()
    images = [read_rgb(path) for path in sorted(args.image_dir.glob("*.jpg"))[:args.num_images]]
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        torch.save(torchvision_reference().state_dict(), Path(tmp) / "w.pth")
        ours = maskrcnn.load(Path(tmp) / "w.pth", precision=args.precision).eval()
        openvino = openvino_runners(Path(tmp) / "w.pth", Path(tmp) / "m.xml")["openvino default"]
        per_image = blocks({f"ours {args.precision}": ours, "openvino default": openvino}, images)
        theirs = openvino_stages(Path(tmp) / "m.xml", images)
        spent = hook_stages(ours)
        mine = []
        for image in images:
            spent.clear()
            start = time.perf_counter()
            ours([image])
            mine.append({"wall": time.perf_counter() - start, **spent})
    print(f"\n{len(images)} COCO val images, {torch.get_num_threads()} threads, random-weight ResNet-50-FPN, "
          f"100 detections per image")
    for name, seconds in per_image.items():
        print(f"{name:<22} {seconds:.3f} s/img (blocks, median of 3)")
    print(f"\n{'stage (ms, median)':<22}{'ours':>8}{'openvino':>10}")
    for rows in (mine, theirs):  # the wall time in no stage
        for row in rows:
            row["outside"] = row["wall"] - sum(v for k, v in row.items() if k != "wall")
    for stage in (*OUR_STAGES, "unnamed graph nodes", "outside", "wall"):
        ms = [1e3 * statistics.median(r.get(stage, 0.0) for r in rows) for rows in (mine, theirs)]
        print(f"{stage:<22}{ms[0]:>8.1f}{ms[1]:>10.1f}")


if __name__ == "__main__":
    main()
