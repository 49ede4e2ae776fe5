"""Peak memory of `maskrcnn.Predictor` and `maskrcnn predict` on a 6000x4000 photo with 100 detections.

    python benchmarks/memory.py                               # this checkout
    python benchmarks/memory.py --before-src /tmp/old/src     # and an older source tree, for before/after
    python benchmarks/memory.py --size 3000x2000 --paths predictor

The photo is a real COCO image (coco-mini val2017, the first one) upscaled to --size. The model is a seeded
random resnet18_fpn whose class scores are scaled up (as tests/conftest.py `tiny_model`) at the usual
800/1333 input size, with score threshold 0 and 100 detections at most, so it finds exactly 100 objects.
Each measurement runs in a fresh process and reports its peak RSS (/proc/self/status VmHWM; ru_maxrss would carry the parent's peak over exec), which
includes the ~0.9 GB that importing torch costs. Paths:
  predictor: Predictor(...)(photo), then to_coco(), semantic_map(), instance_map() and draw(photo);
  cli:       maskrcnn predict --semantic (overlay, predictions, semantic and instance PNGs).
Masks were pasted as one N x H x W float32 array before they were kept as crops: 15.7 GB for this photo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COCO_VAL = ROOT.parent / "shared" / "data" / "coco-mini" / "val2017"

CHILD = r"""
import json, sys
import numpy as np, torch
from PIL import Image
path, weights, photo, out = sys.argv[1:5]
torch.set_num_threads(int(sys.argv[5]))
import maskrcnn
if path == "predictor":
    predictor = maskrcnn.Predictor(weights, score_thresh=0.0, max_detections=100, device="cpu")
    dets = predictor(photo)
    dets.to_coco(), dets.semantic_map(), dets.instance_map()
    dets.draw(np.asarray(Image.open(photo).convert("RGB")))
    found = len(dets)
else:
    from maskrcnn.cli import main
    code = main(["predict", photo, "--weights", weights, "--out", out, "--score-thresh", "0",
                 "--max-detections", "100", "--device", "cpu", "--semantic", "--no-progress"])
    assert code == 0, code
    import glob
    files = glob.glob(out + "/predictions.jsonl") or glob.glob(out + "/predictions.json")
    found = open(files[0]).read().count('"segmentation"')
print(json.dumps({"peak_rss": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024, "detections": found}))
"""


def make_photo(folder: Path, size: tuple[int, int], source: Path | None) -> Path:
    from PIL import Image

    source = source or min(COCO_VAL.glob("*.jpg"))
    with Image.open(source) as im:
        big = im.convert("RGB").resize(size, Image.BICUBIC)
    path = folder / f"photo_{size[0]}x{size[1]}.jpg"
    big.save(path, quality=95)
    return path


def make_weights(folder: Path) -> Path:
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    import maskrcnn

    torch.manual_seed(0)
    model = maskrcnn.build_model("resnet18_fpn", num_classes=4, fpn_channels=64, mask_head_channels=64,
                                 box_head_hidden=256)
    with torch.no_grad():
        model.box_predictor.class_logits.weight.mul_(50)
    model.class_names = ["__background__", "cat", "dog", "bird"]
    model.category_ids = [0, 17, 18, 16]
    path = folder / "random_resnet18.safetensors"
    maskrcnn.save_checkpoint(model, path)
    return path


def measure(src: Path, path: str, weights: Path, photo: Path, folder: Path, threads: int) -> dict:
    out = folder / f"out_{path}_{abs(hash(str(src)))}"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
    run = subprocess.run([sys.executable, "-c", CHILD, path, str(weights), str(photo), str(out), str(threads)],
                         capture_output=True, text=True, env=env, check=False)
    if run.returncode != 0:
        tail = (run.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {run.returncode}: {tail}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="6000x4000", help="photo size WxH (default 6000x4000)")
    parser.add_argument("--image", type=Path, help="the image to upscale (default: coco-mini's first val image)")
    parser.add_argument("--paths", nargs="+", choices=("predictor", "cli"), default=["predictor", "cli"])
    parser.add_argument("--before-src", type=Path, help="an older source tree (its src/) to measure as well")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each process (default 1)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    sources = [("after", ROOT / "src")] + ([("before", args.before_src)] if args.before_src else [])
    print(f"CPU: {cpu_name()}; {args.threads} thread(s); python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        photo, weights = make_photo(folder, (width, height), args.image), make_weights(folder)
        print(f"photo: {width}x{height} from {args.image or min(COCO_VAL.glob('*.jpg')).name}")
        print(f"{'source':8s} {'path':10s} {'detections':>10s} {'peak RSS':>10s}")
        for label, src in sources:
            for path in args.paths:
                result = measure(src, path, weights, photo, folder, args.threads)
                if "error" in result:
                    print(f"{label:8s} {path:10s} {'':>10s} {result['error']}", flush=True)
                else:
                    print(f"{label:8s} {path:10s} {result['detections']:>10d} "
                          f"{result['peak_rss'] / 2**30:>8.2f} GB", flush=True)


if __name__ == "__main__":
    main()
