"""maskrcnn inspect: PNG panels of each stage of the model for one image (module named so as not to
shadow the standard library's `inspect`)."""

from __future__ import annotations

from ..checks import COUNT, PROBABILITY
from ._options import add_device_option

NAME = "inspect"
HELP = "draw each stage (anchors, proposals before/after NMS, box refinement, masks) for one image"
ORDER = 50


def add_arguments(p) -> None:
    p.add_argument("image", help="an image file")
    p.add_argument("--weights", required=True, help="checkpoint path or registered name")
    p.add_argument("--out", required=True, help="folder for the PNG panels")
    add_device_option(p, default="cpu")
    p.add_argument("--score-thresh", type=PROBABILITY.flag, default=0.5,
                   help="detections shown: those scoring above this, 0 to 1 (default 0.5)")
    p.add_argument("--max-boxes", type=COUNT.flag, default=300, help="proposals drawn per panel (default 300)")


def run(args) -> int:
    from ..data.images import read_image
    from ..engine.stage_panels import write_stage_panels
    from ..devices import resolve_device
    from ..weights import load

    model = load(args.weights, device=resolve_device(args.device), score_thresh=args.score_thresh)
    image = read_image(args.image)
    for path in write_stage_panels(model, image, args.out, max_boxes=args.max_boxes):
        print(path)
    return 0
