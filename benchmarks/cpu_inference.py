"""Our Mask R-CNN vs torchvision's, same weights, same real images, one process, alternating runs.

    python benchmarks/cpu_inference.py                 # inference, fp32 + bf16, 6 COCO val images
    python benchmarks/cpu_inference.py --train         # also the training step, ours vs torchvision
    python benchmarks/cpu_inference.py --onnx          # also our model exported to ONNX, on ONNX Runtime
    python benchmarks/cpu_inference.py --agreement-weights runs/shapes/model.safetensors \
        --agreement-images data/shapes/val             # also bf16 vs fp32 of a trained model

Prints median seconds per image for each path, the ratio to torchvision, the FLOPs of one forward pass
(torch.utils.flop_counter) and the achieved GFLOP/s, and how well the detections agree:
  fp32: one-to-one match (same order, label), max |box|, |score| and |mask prob| differences;
  bf16 and ONNX: share of torchvision's detections matched (same class, box IoU >= 0.9), mean mask IoU.
Machines are noisy, so only ratios measured side by side in one run are meaningful.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reference import torchvision_reference  # noqa: E402

import maskrcnn  # noqa: E402

DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "coco-mini" / "val2017"


def read_rgb(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou as iou

    return iou(a, b)


def agreement_exact(ref: dict, ours: dict) -> dict:
    same = len(ref["boxes"]) == len(ours["boxes"]) and torch.equal(ref["labels"], ours["labels"])
    out = {"same_detections": same, "n": len(ref["boxes"])}
    if same and len(ref["boxes"]):
        out["box"] = (ref["boxes"] - ours["boxes"]).abs().max().item()
        out["score"] = (ref["scores"] - ours["scores"]).abs().max().item()
        out["mask"] = (ref["masks"] - ours["masks"]).abs().max().item()
    return out


def agreement_matched(ref: dict, ours: dict, iou_thresh: float = 0.9) -> tuple[int, int, list[float]]:
    """Greedy one-to-one matching in reference score order: same class and box IoU >= iou_thresh."""
    if len(ref["boxes"]) == 0:
        return 0, 0, []
    if len(ours["boxes"]) == 0:
        return 0, len(ref["boxes"]), []
    ious = box_iou(ref["boxes"], ours["boxes"])
    ious[ref["labels"][:, None] != ours["labels"][None, :]] = 0
    taken = torch.zeros(len(ours["boxes"]), dtype=torch.bool)
    matched, mask_ious = 0, []
    for i in range(len(ref["boxes"])):
        cand = ious[i].clone()
        cand[taken] = 0
        j = int(cand.argmax())
        if cand[j] >= iou_thresh:
            taken[j] = True
            matched += 1
            a, b = ref["masks"][i, 0] > 0.5, ours["masks"][j, 0] > 0.5
            union = (a | b).sum().item()
            mask_ious.append((a & b).sum().item() / union if union else 1.0)
    return matched, len(ref["boxes"]), mask_ious


def count_flops(model, image) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model([image])
    return counter.get_total_flops()


def inference(args) -> None:
    paths = sorted(Path(args.images).glob("*.jpg"))[: args.num_images]
    if not paths:
        sys.exit(f"no .jpg images in {args.images}")
    images = [read_rgb(p) for p in paths]
    reference = torchvision_reference(args.arch)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(reference.state_dict(), Path(tmp) / "weights.pth")
        ours = {p: maskrcnn.load(Path(tmp) / "weights.pth", precision=p) for p in args.precisions}
        runners = {"torchvision fp32": reference, **{f"ours {p}": m for p, m in ours.items()}}
        if args.onnx:
            from maskrcnn.export.files import export
            from maskrcnn.export.runtime import ExportedModel

            onnx_path = export(maskrcnn.load(Path(tmp) / "weights.pth"), Path(tmp) / "model.onnx")
            runners["ours onnxruntime"] = ExportedModel.load(onnx_path)
        if args.openvino:
            runners.update(openvino_runners(Path(tmp) / "weights.pth", Path(tmp) / "model.xml"))
    times = {name: [] for name in runners}
    exact, matched = [], {name: [0, 0, []] for name in runners if name not in ("torchvision fp32", "ours fp32")}
    with torch.no_grad():
        for name, model in runners.items():  # warm-up (allocations, oneDNN kernel selection)
            model([images[0]])
        for image in images:
            outputs = {}
            for _ in range(args.repeats):
                for name, model in runners.items():
                    seconds, outputs[name] = timed(model, [image])
                    times[name].append(seconds)
            ref = outputs["torchvision fp32"][0]
            if "ours fp32" in outputs:
                exact.append(agreement_exact(ref, outputs["ours fp32"][0]))
            for name, tally in matched.items():
                if name in outputs:
                    m, n, ious = agreement_matched(ref, outputs[name][0])
                    tally[0], tally[1] = tally[0] + m, tally[1] + n
                    tally[2] += ious
    flops = count_flops(reference, images[0])
    base = statistics.median(times["torchvision fp32"])
    print(f"\nCPU inference, arch {args.arch}, {len(images)} COCO val images x {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"forward FLOPs on {paths[0].name} ({tuple(images[0].shape[1:])}): {flops / 1e9:.0f} GFLOP")
    print(f"{'path':<20}{'median s/img':>14}{'speed-up':>10}{'GFLOP/s':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<20}{med:>14.3f}{base / med:>9.2f}x{flops / 1e9 / med:>10.0f}")
    if exact:
        same = sum(e["same_detections"] for e in exact)
        worst = {k: max(e.get(k, 0.0) for e in exact) for k in ("box", "score", "mask")}
        print(f"fp32 agreement: {same}/{len(exact)} images with identical detections "
              f"({sum(e['n'] for e in exact)} detections); max |box| {worst['box']:.2e} px, "
              f"|score| {worst['score']:.2e}, |mask| {worst['mask']:.2e}")
    for name, (matched_total, ref_total, mask_ious) in matched.items():
        if ref_total:
            print(f"{name} agreement: {matched_total}/{ref_total} = {100 * matched_total / ref_total:.1f}% of "
                  f"detections matched (same class, box IoU >= 0.9); mean mask IoU "
                  f"{statistics.mean(mask_ious or [0]):.3f}")


def openvino_runners(weights: Path, xml: Path) -> dict:
    """Our export of the same weights in OpenVINO: with f32 forced, and with OpenVINO's default settings
    (its own choice of precision for this CPU: bf16 where the CPU has it), the anchor a deployer would pick."""
    from maskrcnn.export.files import export
    from maskrcnn.export.openvino_ir import OPENVINO_DEFAULT, open_ir
    from maskrcnn.export.runtime import INPUT_NAMES, METADATA_KEY, ExportedModel, _parse_metadata

    export(maskrcnn.load(weights), xml, "openvino")
    runners = {"openvino f32": ExportedModel.load(xml)}
    run, text = open_ir(xml, METADATA_KEY, INPUT_NAMES, OPENVINO_DEFAULT, torch.get_num_threads())
    runners["openvino default"] = ExportedModel(run, _parse_metadata(text, xml), str(xml))
    return runners


def trained_agreement(args) -> None:
    """Each faster precision vs fp32 of one trained checkpoint (ours) on a folder of images: how many fp32
    detections it keeps. A random-weight network is chaotic (a 1e-6 change moves its boxes), so its
    agreement says little about a trained model's; this measures a trained one."""
    paths = sorted(p for p in Path(args.agreement_images).iterdir() if p.suffix.lower() in (".jpg", ".png"))
    paths = paths[: args.agreement_num_images]
    if not paths:
        sys.exit(f"no .jpg/.png images in {args.agreement_images}")
    faster = [p for p in args.precisions if p != "fp32"] or ["bf16"]
    models = {p: maskrcnn.load(args.agreement_weights, precision=p, score_thresh=args.agreement_score_thresh)
              for p in ("fp32", *faster)}
    tally = {p: [0, 0, []] for p in faster}
    with torch.no_grad():
        for path in paths:
            image = read_rgb(path)
            ref = models["fp32"]([image])[0]
            for p in faster:
                m, n, ious = agreement_matched(ref, models[p]([image])[0])
                tally[p][0], tally[p][1] = tally[p][0] + m, tally[p][1] + n
                tally[p][2] += ious
    for p, (matched, total, mask_ious) in tally.items():
        print(f"\n{p} vs fp32 of the trained model {args.agreement_weights} on {len(paths)} images of "
              f"{args.agreement_images} (score >= {args.agreement_score_thresh}): {matched}/{total} = "
              f"{100 * matched / max(total, 1):.1f}% of detections matched (same class, box IoU >= 0.9); "
              f"mean mask IoU {statistics.mean(mask_ious or [0]):.3f}")


def training_step(args) -> None:
    """One SGD step on the same batch and config: torchvision's model vs ours (fp32, and ours in bf16)."""
    paths = sorted(Path(args.images).glob("*.jpg"))[:2]
    images = [read_rgb(p) for p in paths]
    g = torch.Generator().manual_seed(0)
    targets = []
    for im in images:
        h, w = im.shape[-2:]
        xy = torch.rand(4, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        boxes = torch.cat((xy, xy + 20 + torch.rand(4, 2, generator=g) * torch.tensor([w * 0.4, h * 0.4])), 1)
        masks = torch.zeros(4, h, w, dtype=torch.uint8)
        for m, b in zip(masks, boxes.long()):
            m[b[1]:b[3], b[0]:b[2]] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 91, (4,), generator=g), "masks": masks})
    reference = torchvision_reference(args.arch)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(reference.state_dict(), Path(tmp) / "weights.pth")
        ours = maskrcnn.load(Path(tmp) / "weights.pth")
    reference.train()
    ours.train()

    def step(model, bf16=False):
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses = model(images, [dict(t) for t in targets])
        loss = sum(losses.values())
        for p in params:
            p.grad = None
        loss.backward()

    runners = {"torchvision fp32": lambda: step(reference), "ours fp32": lambda: step(ours)}
    if "bf16" in args.precisions:
        runners["ours bf16"] = lambda: step(ours, True)
    times = {k: [] for k in runners}
    for fn in runners.values():
        fn()
    for _ in range(args.repeats):
        for name, fn in runners.items():
            times[name].append(timed(fn)[0])
    base = statistics.median(times["torchvision fp32"])
    print(f"\nTraining step, arch {args.arch}, batch of 2 COCO images at 800 px, {args.repeats} repeats")
    print(f"{'path':<20}{'median s/step':>14}{'speed-up':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<20}{med:>14.3f}{base / med:>9.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of .jpg images")
    p.add_argument("--num-images", type=int, default=6)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--arch", choices=["v1", "v2"], default="v1")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "fp32-fast", "bf16"])
    p.add_argument("--train", action="store_true", help="also time one training step")
    p.add_argument("--train-only", action="store_true", help="only the training step")
    p.add_argument("--onnx", action="store_true", help="also time our model exported to ONNX, on ONNX Runtime")
    p.add_argument("--openvino", action="store_true",
                   help="also time our model exported to OpenVINO IR: f32, and OpenVINO's default settings")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--agreement-weights", help="a trained checkpoint: also report its bf16-vs-fp32 agreement")
    p.add_argument("--agreement-images", help="images for --agreement-weights")
    p.add_argument("--agreement-num-images", type=int, default=60)
    p.add_argument("--agreement-score-thresh", type=float, default=0.05)
    p.add_argument("--agreement-only", action="store_true", help="only the trained model's agreement")
    args = p.parse_args()
    if bool(args.agreement_weights) != bool(args.agreement_images):
        p.error("--agreement-weights and --agreement-images go together")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.train_only or args.agreement_only):
        inference(args)
    if args.agreement_weights:
        trained_agreement(args)
    if args.train or args.train_only:
        training_step(args)


if __name__ == "__main__":
    main()
