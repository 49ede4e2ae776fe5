"""Flags several commands share, declared once so they read and check the same everywhere."""

from __future__ import annotations

import argparse

from ..checks import COUNT, NON_NEGATIVE, PROBABILITY

TRUST_HELP = ("run a TorchScript file given as --weights (TorchScript is a program, not data: pass this only "
              "for files you made or trust)")


def add_detection_options(p, score_default: float, score_use: str) -> None:
    """--score-thresh, --mask-threshold, --max-detections: the same rules for eval and predict."""
    p.add_argument("--score-thresh", type=PROBABILITY.flag, default=score_default, metavar="S",
                   help=f"keep detections scoring above this, 0 to 1 (default {score_default}; {score_use})")
    p.add_argument("--mask-threshold", type=PROBABILITY.flag, default=0.5, metavar="P",
                   help="a pixel belongs to an object when its mask probability is at least this, 0 to 1 "
                        "(default 0.5)")
    p.add_argument("--max-detections", type=COUNT.flag, default=100, metavar="N",
                   help="at most this many objects per image (default 100, as in COCO evaluation)")


def add_device_option(p, default: str = "auto") -> None:
    """--device, read by maskrcnn.devices.resolve_device; `default` argparse.SUPPRESS leaves it to a config."""
    shown = default if default != argparse.SUPPRESS else "auto"
    p.add_argument("--device", default=default, help=f"auto (CUDA when present), cpu, cuda or cuda:N (default {shown})")


def add_trust_option(p) -> None:
    p.add_argument("--trust-torchscript", action="store_true", help=TRUST_HELP)


def add_weights_option(p) -> None:
    """--weights: what `Predictor` loads (predict and serve alike)."""
    p.add_argument("--weights", required=True, metavar="SRC",
                   help="checkpoint file (ours or a torchvision state dict), a registered name, or a file "
                        "from `maskrcnn export` (.onnx runs on ONNX Runtime, TorchScript only with "
                        "--trust-torchscript; exported files run on the CPU)")


def add_precision_option(p) -> None:
    """--precision for the commands that predict (predict, demo, serve); see maskrcnn/precision.py."""
    p.add_argument("--precision", choices=("auto", "fp32", "fp32-fast", "bf16", "fp16"), default="auto",
                   help="arithmetic: auto (default: bf16 on CPUs with native bf16 (AVX512-BF16 / AMX) and on "
                        "GPUs that have it, fp32-fast on other CPUs), fp32 (torchvision's arithmetic exactly), "
                        "fp32-fast (fp32 with folded norms and channels-last), bf16, fp16 (GPU)")


def add_max_pixels_option(p, default: int, default_help: str) -> None:
    """--max-pixels in millions (0: no limit); `predictor_options` turns it into Predictor's pixel count."""
    p.add_argument("--max-pixels", type=NON_NEGATIVE.flag, default=default / 1e6, metavar="MP",
                   help="refuse images with more than MP million pixels, read from the file header before "
                        f"decoding (0: no limit). Default {default_help}")


def predictor_options(args) -> dict:
    """The `Predictor` keyword arguments of the flags above (and of add_detection_options)."""
    return dict(score_thresh=args.score_thresh, mask_threshold=args.mask_threshold,
                max_detections=args.max_detections, precision=args.precision,
                trust_torchscript=args.trust_torchscript, max_pixels=round(args.max_pixels * 1e6) or None)
