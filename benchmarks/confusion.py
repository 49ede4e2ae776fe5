"""Where a model's AP goes: for each ground-truth object, the class of the detection that overlaps it most
(box IoU >= 0.5, score >= --score), or "missed". Rows: true class; columns: predicted class, then missed.
A second table counts right / wrong class / missed by the longer side of the object's box.

    python benchmarks/confusion.py --weights runs/shapes/model.safetensors \\
        --annotations data/shapes/annotations/instances_val.json --images data/shapes/val
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_inference import read_rgb  # noqa: E402

import maskrcnn  # noqa: E402

SIZE_BINS = [0, 24, 40, 64]  # lower edges of the size rows (longer box side in pixels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--score", type=float, default=0.3)
    args = p.parse_args()
    from pycocotools.coco import COCO

    model = maskrcnn.load(args.weights, score_thresh=args.score)
    coco = COCO(args.annotations)
    label_of = {cat: i for i, cat in enumerate(model.category_ids)}
    names = model.class_names[1:]
    table = np.zeros((len(names), len(names) + 1), dtype=int)
    by_size = np.zeros((len(SIZE_BINS), 3), dtype=int)  # right class, wrong class, missed
    with torch.no_grad():
        for image_id in coco.getImgIds():
            anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a.get("iscrowd")]
            if not anns:
                continue
            out = model([read_rgb(Path(args.images) / coco.imgs[image_id]["file_name"])])[0]
            gt = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
            iou = box_iou(gt, out["boxes"]) if len(out["boxes"]) else torch.zeros(len(gt), 1)
            for i, a in enumerate(anns):
                j = int(iou[i].argmax())
                found = len(out["boxes"]) and iou[i, j] >= 0.5
                true, predicted = label_of[a["category_id"]], int(out["labels"][j]) if found else None
                table[true - 1, predicted - 1 if found else len(names)] += 1
                size = int(np.searchsorted(SIZE_BINS[1:], max(a["bbox"][2], a["bbox"][3]), side="right"))
                by_size[size, 2 if not found else 0 if predicted == true else 1] += 1
    width = max(len(n) for n in names + ["missed"]) + 2
    print("true \\ predicted".ljust(width) + "".join(n.rjust(width) for n in names + ["missed"]))
    for name, row in zip(names, table):
        print(name.ljust(width) + "".join(str(v).rjust(width) for v in row))
    print()
    print("longer side (px)".ljust(18) + "".join(n.rjust(width) for n in ("right", "wrong", "missed")))
    for low, high, row in zip(SIZE_BINS, SIZE_BINS[1:] + [None], by_size):
        label = f"{low}-{high}" if high else f">= {low}"
        print(label.ljust(18) + "".join(str(v).rjust(width) for v in row))


if __name__ == "__main__":
    main()
