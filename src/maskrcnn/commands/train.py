"""maskrcnn train: train or fine-tune on a COCO-format dataset (one process, or N under torchrun).

Settings come in layers, later ones winning: TrainConfig defaults (maskrcnn/engine/config.py) < the
run's saved settings (with --resume) < --config FILE < command-line flags.
"""

from __future__ import annotations

import argparse

from ..engine.train_rules import flag
from ._options import add_device_option

NAME = "train"
HELP = "train or fine-tune Mask R-CNN on a COCO-format dataset (runs under torchrun for several processes)"
ORDER = 20

# flag destination -> TrainConfig field, for flags that map one to one
_DIRECT = {
    "train_annotations": "train_annotations", "train_images": "train_images",
    "val_annotations": "val_annotations", "val_images": "val_images", "arch": "arch", "out": "out",
    "init": "init", "iters": "iters", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
    "optimizer": "optimizer",
    "weight_decay": "weight_decay", "warmup_iters": "warmup_iters", "schedule": "schedule", "cooldown": "cooldown",
    "device": "device",
    "workers": "num_workers", "threads": "threads", "min_size": "min_sizes", "max_size": "max_size", "lsj": "lsj", "seed": "seed",
    "eval_every": "eval_every", "checkpoint_every": "checkpoint_every", "log_every": "log_every",
    "skip_invalid": "skip_invalid",
}


def add_arguments(p) -> None:
    S = argparse.SUPPRESS  # unset flags stay absent, so they do not override the config file
    data = p.add_argument_group("data")
    data.add_argument("--train-annotations", metavar="JSON", default=S, help="COCO instances json of the training set")
    data.add_argument("--train-images", metavar="DIR", default=S, help="folder of the training images")
    data.add_argument("--val-annotations", metavar="JSON", default=S, help="validation json (enables COCO AP)")
    data.add_argument("--val-images", metavar="DIR", default=S, help="folder of the validation images")
    data.add_argument("--out", metavar="RUN_DIR", default=S,
                      help="run folder: last.pt, model.safetensors, best.safetensors, metrics.jsonl, curves.png")
    data.add_argument("--config", metavar="FILE", help="YAML or JSON file of TrainConfig fields (flags override it)")
    data.add_argument("--skip-invalid", action="store_true", default=S,
                      help="leave out images and annotations with problems (one warning) instead of stopping")

    model = p.add_argument_group("model")
    model.add_argument("--arch", default=S, help="architecture when training from scratch (default resnet18_fpn)")
    model.add_argument("--init", metavar="WEIGHTS", default=S,
                       help="fine-tune from these weights (class layers adapted to the dataset's classes)")
    model.add_argument("--norm", choices=("gn", "bn", "frozen_bn"), default=S,
                       help="normalisation in backbone, FPN and heads (from-scratch default: bn everywhere; "
                            "frozen_bn leaves the mlp box head without a norm)")
    model.add_argument("--model-option", metavar="KEY=VALUE", action="append", default=S,
                       help="any ModelConfig field, e.g. box_head=conv or rpn.post_nms_top_n_train=1000 "
                            "(repeatable; VALUE read as YAML)")

    opt = p.add_argument_group("schedule")
    length = opt.add_mutually_exclusive_group()
    length.add_argument("--iters", type=flag("iters"), default=S, help="run length in iterations")
    length.add_argument("--epochs", type=flag("epochs"), default=S, help="run length in epochs")
    opt.add_argument("--batch-size", type=flag("batch_size"), default=S,
                     help="global batch size (split across processes)")
    opt.add_argument("--lr", type=flag("lr"), default=S, help="peak learning rate")
    opt.add_argument("--weight-decay", type=flag("weight_decay"), default=S,
                     help="weight decay (default 1e-4 for SGD, 0.05 for AdamW; 0: none)")
    opt.add_argument("--warmup-iters", type=flag("warmup_iters"), default=S,
                     help="iterations of linear lr warm-up (default 100)")
    opt.add_argument("--schedule", choices=("auto", "cosine", "step", "constant"), default=S,
                     help="lr after warm-up; auto (default): constant from scratch (see --cooldown), cosine decay "
                          "when fine-tuning")
    opt.add_argument("--cooldown", type=flag("cooldown"), default=S, metavar="FRACTION",
                     help="constant schedule: the lr falls linearly to 0 over this last fraction of the run "
                          "(default 0.2; 0: none)")
    opt.add_argument("--ema", type=flag("ema_decay"), default=S, metavar="DECAY",
                     help="evaluate and save a moving average of the weights with this decay (0: the raw weights)")
    opt.add_argument("--grad-clip", type=flag("grad_clip"), default=S, metavar="NORM",
                     help="max gradient norm (0: off)")
    opt.add_argument("--amp", action="store_true", default=S, help="CUDA float16 mixed precision")
    opt.add_argument("--bf16", action="store_true", default=S,
                     help="bfloat16 autocast (CPU or CUDA); on by default for CPUs with native bf16")
    opt.add_argument("--fp32", action="store_true", default=S, help="no bfloat16 autocast, even where it is the default")
    opt.add_argument("--optimizer", choices=("auto", "sgd", "adamw"), default=S,
                     help="auto (default): AdamW from scratch, SGD with momentum when fine-tuning (--init)")
    opt.add_argument("--seed", type=flag("seed"), default=S, help="run seed (default 0)")

    aug = p.add_argument_group("training images")
    aug.add_argument("--min-size", type=flag("min_sizes"), nargs="+", default=S, metavar="S",
                     help="shorter side(s) in training, one picked per image (eval uses the largest)")
    aug.add_argument("--max-size", type=flag("max_size"), default=S,
                     help="longer side limit in training and evaluation")
    aug.add_argument("--lsj", type=flag("lsj"), default=S, metavar="SIZE",
                     help="large scale jitter to SIZE x SIZE crops instead of --min-size/--max-size")
    aug.add_argument("--no-flip", action="store_true", default=S, help="no random horizontal flips")

    run = p.add_argument_group("run")
    add_device_option(run, default=S)
    run.add_argument("--workers", type=flag("num_workers"), default=S,
                     help="data loading processes (default: 0 on CPU, 2 on CUDA)")
    run.add_argument("--threads", type=flag("threads"), default=S,
                     help="CPU threads per process (default: torch's choice)")
    run.add_argument("--resume", action="store_true", help="continue RUN_DIR/last.pt (exactly where it stopped)")
    run.add_argument("--eval-every", type=flag("eval_every"), default=S, metavar="N",
                     help="validate every N iterations")
    run.add_argument("--checkpoint-every", type=flag("checkpoint_every"), default=S, metavar="N")
    run.add_argument("--log-every", type=flag("log_every"), default=S, metavar="N")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_value(text: str):
    """YAML, except that what Python reads as a number is one (YAML 1.1 leaves 1e-3 and nan as text)."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _model_options(args, base: dict) -> dict:
    from ..errors import MaskRCNNError

    options = dict(base)
    if hasattr(args, "norm"):
        options.update(backbone_norm=args.norm, fpn_norm=args.norm, head_norm=args.norm,
                       mlp_head_norm=args.norm if args.norm in ("bn", "gn") else None)
    for item in getattr(args, "model_option", []):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MaskRCNNError(f"--model-option expects KEY=VALUE, got {item!r}")
        if key.startswith("rpn."):
            options["rpn"] = {**options.get("rpn", {}), key[4:]: _parse_value(value)}
        else:
            options[key] = _parse_value(value)
    return options


def build_config(args):
    """The TrainConfig this command line asks for (see the module docstring for the layering)."""
    from pathlib import Path

    from ..engine.checkpoint import read_training_checkpoint
    from ..engine.train import TrainConfig, config_with, load_config_file
    from ..errors import MaskRCNNError

    config = TrainConfig()
    if args.resume:
        out = Path(getattr(args, "out", None) or config.out)
        saved = read_training_checkpoint(out / "last.pt").get("train_config") or {}
        config = config_with(config, saved, str(out / "last.pt"))
    if args.config:
        config = config_with(config, load_config_file(args.config), args.config)
    changes = {field: getattr(args, flag) for flag, field in _DIRECT.items() if hasattr(args, flag)}
    if "min_sizes" in changes:
        changes["min_sizes"] = tuple(changes["min_sizes"])
    if hasattr(args, "grad_clip"):
        changes["grad_clip"] = args.grad_clip or None
    if hasattr(args, "ema"):
        changes["ema_decay"] = args.ema or None
    if hasattr(args, "amp"):
        changes["amp"] = True
    if hasattr(args, "bf16") and hasattr(args, "fp32"):
        raise MaskRCNNError("choose one of --bf16 and --fp32")
    if hasattr(args, "bf16"):
        changes["bf16"] = True
    if hasattr(args, "fp32"):
        changes["bf16"] = False
    if hasattr(args, "no_flip"):
        changes["flip"] = False
    if hasattr(args, "norm") or hasattr(args, "model_option"):
        config = config_with(config, {"model": _model_options(args, config.model)}, "--model-option")
    return config_with(config, changes, "command line")


def run(args) -> int:
    from ..engine.train import train
    from ..errors import MaskRCNNError

    config = build_config(args)
    if not config.train_annotations or not config.train_images:
        raise MaskRCNNError("--train-annotations and --train-images are required (or set them in --config)")
    train(config, resume=args.resume, progress=not args.no_progress)
    return 0
