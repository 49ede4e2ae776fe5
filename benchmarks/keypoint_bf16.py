"""bf16 agreement of the keypoint branch: torchvision's Keypoint R-CNN layout with seeded random weights
(benchmarks/reference.py), our model in precision="bf16" against its own fp32 on COCO person photos.

Two figures: end to end (detections matched by class and box IoU >= 0.9, then their keypoints compared),
and the keypoint branch alone (the fp32 detections' boxes, keypoints from bf16 features and head vs fp32).
The random reference is chaotic (benchmarks/README.md, bf16 agreement), so the end-to-end match rate says
little; the branch-alone distances are the keypoint head's own bf16 error.

    PYTHONPATH=src python benchmarks/keypoint_bf16.py [--images 000000350679 ...]

With --weights (a trained keypoint model) and --folder (its validation images), the same two figures on
that model instead: a trained model's agreement is the one that says what bf16 costs.

    PYTHONPATH=src python benchmarks/keypoint_bf16.py --weights runs/figures/model.safetensors \\
        --folder data/figures/val [--annotations data/figures/annotations/keypoints_val.json]

With --annotations (the folder's COCO keypoint file) also the model's keypoint and box AP in each precision.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.reference import torchvision_keypoint_reference  # noqa: E402
import maskrcnn  # noqa: E402
from maskrcnn.modeling.fpn import pooled_levels  # noqa: E402
from maskrcnn.modeling.plan import inference_plan  # noqa: E402

PHOTOS = ROOT / "tests" / "assets" / "coco" / "val2017"


def read(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def branch_alone(model, image: torch.Tensor, boxes: torch.Tensor, precision: str) -> torch.Tensor:
    """Keypoints of the given (resized-image) boxes from `precision` features and keypoint head."""
    batch, sizes, _ = model.transform([image])
    plan = inference_plan(precision)
    if plan.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), model._autocast(batch.device, precision):
        levels = [f.float() for f in pooled_levels(model.features(batch, plan))]
        return model.predict_keypoints(levels, [boxes], sizes, plan)[0][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", default=["000000350679", "000000183709", "000000151938"],
                        help="COCO photos of tests/assets (random reference model)")
    parser.add_argument("--weights", help="a trained keypoint model instead of the random reference")
    parser.add_argument("--folder", help="with --weights: the images to compare on (every .png/.jpg)")
    parser.add_argument("--annotations", help="with --weights: the folder's COCO keypoint json, for AP")
    args = parser.parse_args()
    if args.weights:
        model = maskrcnn.load(args.weights)
        paths = sorted(p for p in Path(args.folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(torchvision_keypoint_reference().state_dict(), Path(tmp) / "kp.pth")
            model = maskrcnn.load(Path(tmp) / "kp.pth")
        paths = [PHOTOS / f"{name}.jpg" for name in args.images]
    matched = total = 0
    end_to_end, alone = [], []
    for path in paths:
        image = read(path)
        fp32 = model.predict([image], settings=model.inference_settings(precision="fp32"))[0]
        bf16 = model.predict([image], settings=model.inference_settings(precision="bf16"))[0]
        total += len(fp32["boxes"])
        if len(fp32["boxes"]) and len(bf16["boxes"]):
            iou = box_iou(fp32["boxes"], bf16["boxes"])
            best, j = iou.max(1)
            ok = (best >= 0.9) & (fp32["labels"] == bf16["labels"][j])
            matched += int(ok.sum())
            end_to_end.append((fp32["keypoints"][ok, :, :2] - bf16["keypoints"][j[ok], :, :2]).norm(dim=-1).flatten())
        # the branch alone, on the fp32 boxes in resized-image pixels
        _, sizes, _ = model.transform([image])
        scale = torch.tensor([sizes[0][1] / image.shape[-1], sizes[0][0] / image.shape[-2]] * 2)
        boxes = fp32["boxes"] * scale
        a, b = branch_alone(model, image, boxes, "fp32"), branch_alone(model, image, boxes, "bf16")
        alone.append(((a[..., :2] - b[..., :2]).norm(dim=-1) / scale[0]).flatten())  # in input pixels
    print(f"end to end: {matched}/{total} = {100 * matched / max(total, 1):.1f}% of fp32 detections matched")
    for label, d in (("end to end, matched", end_to_end), ("keypoint branch alone", alone)):
        d = torch.cat(d) if d else torch.zeros(0)
        if len(d):
            print(f"{label}: {len(d)} keypoints, identical {100 * float((d == 0).float().mean()):.1f}%, "
                  f"within 1 px {100 * float((d <= 1).float().mean()):.1f}%, median {float(d.median()):.2f} px, "
                  f"95th percentile {float(d.quantile(0.95)):.2f} px")
    if args.weights and args.annotations:
        average_precisions(model, args.annotations, args.folder)


def average_precisions(model, annotations: str, folder: str) -> None:
    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.engine.trainer import evaluate_model

    dataset = CocoDataset(annotations, folder)
    for precision in ("fp32", "bf16"):
        model.precision = precision  # the default of every predict call
        metrics = evaluate_model(model, dataset, torch.device("cpu"))
        print(f"{precision}: keypoint AP {metrics['keypoints']['AP']:.3f}, bbox AP {metrics['bbox']['AP']:.3f}")


if __name__ == "__main__":
    main()
