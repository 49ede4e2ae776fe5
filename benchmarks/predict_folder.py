"""Folder throughput of `maskrcnn predict`: reading, the model and writing overlapped (the command) vs the
same work one step after the other (this script's serial loop over the public API), side by side.

    .venv/bin/python benchmarks/predict_folder.py --images ../shared/data/coco-mini/val2017 --num-images 50 \
        --weights runs/shapes/model.safetensors --precision auto

Both write an overlay PNG and the COCO entries of every image; the runs alternate (serial, overlapped,
serial, overlapped, ...) and the ratio of their median images/s is printed with the CPU's name.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from maskrcnn import Predictor  # noqa: E402
from maskrcnn.cli import main as cli  # noqa: E402
from maskrcnn.data.images import read_image  # noqa: E402
from maskrcnn.viz import save_png  # noqa: E402


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def serial(paths: list[Path], weights: str, precision: str, out: Path) -> None:
    """The pre-overlap loop: read, predict, draw and write each image in turn."""
    predictor = Predictor(weights, precision=precision)
    entries = []
    for path in paths:
        image = read_image(path)
        result = predictor(image)
        result.file_name = str(path)
        entries.extend(result.to_coco())
        save_png(out / f"{path.stem}.png", result.draw(image))
    (out / "predictions.json").write_text(json.dumps(entries))


def overlapped(paths: list[Path], weights: str, precision: str, out: Path) -> None:
    status = cli(["predict", "--weights", weights, "--out", str(out), "--precision", precision, "--no-progress",
                  "--device", "cpu", *map(str, paths)])
    if status != 0:
        sys.exit(f"maskrcnn predict failed with status {status}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True)
    p.add_argument("--num-images", type=int, default=50)
    p.add_argument("--weights", required=True)
    p.add_argument("--precision", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    paths = sorted(Path(args.images).glob("*.jpg"))[: args.num_images]
    if not paths:
        sys.exit(f"no .jpg images in {args.images}")
    rates: dict[str, list[float]] = {"serial": [], "overlapped": []}
    for _ in range(args.repeats):
        for name, run in (("serial", serial), ("overlapped", overlapped)):
            with tempfile.TemporaryDirectory() as tmp:
                started = time.perf_counter()
                run(paths, args.weights, args.precision, Path(tmp))
                rates[name].append(len(paths) / (time.perf_counter() - started))
    base = statistics.median(rates["serial"])
    print(f"\n{len(paths)} images of {args.images}, {args.weights}, precision {args.precision}, "
          f"{torch.get_num_threads()} threads, {cpu_name()}")
    for name, values in rates.items():
        print(f"{name:<12}{statistics.median(values):8.2f} images/s  {statistics.median(values) / base:5.2f}x")


if __name__ == "__main__":
    main()
