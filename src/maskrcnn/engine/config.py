"""TrainConfig, the settings of a training run: its defaults (the CPU-friendly from-scratch recipe), reading
and merging config files, the checks of a whole config, and the "auto" settings resolved for a device.
The numeric range of each setting is in train_rules.py."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..checks import NON_NEGATIVE, check_fields
from ..errors import MaskRCNNError, first_line
from .train_rules import OPTIONAL, TRAIN_RULES

if TYPE_CHECKING:
    import torch

# ModelConfig overrides for training from scratch. Why each value (with the AP it gained or cost on the shapes
# data): benchmarks/README.md, "Why each value of the from-scratch recipe". Under torchrun on CPU each process
# normalises over its own images (SyncBatchNorm is CUDA-only): set the four norms to "gn" where several CPU
# processes must match one process exactly. 100 test proposals keep at most ~100 objects per image: raise
# rpn.post_nms_top_n_test for crowded images.
SCRATCH_MODEL = {
    "backbone_norm": "bn", "fpn_norm": "bn", "head_norm": "bn", "mlp_head_norm": "bn", "frozen_stages": 0,
    "fpn_channels": 128, "mask_head_channels": 128, "box_head_hidden": 512, "box_batch_size_per_image": 64,
    "keypoint_head_channels": 128, "keypoint_head_convs": 4,  # used only on keypoint data
    "box_positive_fraction": 0.5, "mask_rois_per_image": 16,
    "box_head": "split_mlp", "gt_jitter_copies": 10,
    "box_sampling_ratio": 4,
    "mask_paste": "exact",
    "anchor_sizes": [16, 32, 64, 128, 256],
    "rpn": {"pre_nms_top_n_train": 500, "post_nms_top_n_train": 500, "post_nms_top_n_test": 100},
}

# What the model returns in training mode (maskrcnn/modeling/losses.py), the keys of loss_weights.
LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask", "loss_keypoint")

# Settings that change what a run computes; changing one on --resume means the run no longer matches an
# uninterrupted one (allowed, e.g. to extend a run, but reported).
RECIPE_FIELDS = ("train_annotations", "arch", "model", "scratch_model", "init", "iters", "epochs", "batch_size",
                 "lr", "momentum", "weight_decay", "no_decay_norm_and_bias", "warmup_iters", "warmup_factor",
                 "schedule", "steps", "gamma", "min_lr_factor", "cooldown", "ema_decay", "loss_weights",
                 "grad_clip", "amp", "bf16", "seed", "min_sizes",
                 "max_size", "flip", "lsj", "lsj_scale")


@dataclass
class TrainConfig:
    """Everything a training run depends on. The defaults are the CPU-friendly from-scratch recipe:
    change them here to change them everywhere (CLI, config files, tests)."""

    # data
    train_annotations: str = ""
    train_images: str = ""
    val_annotations: str | None = None
    val_images: str | None = None
    out: str = "runs/train"                    # RUN_DIR: checkpoints, metrics.jsonl, curves.png, config.yaml
    skip_invalid: bool = False                 # leave out images/annotations with problems instead of stopping
    # model
    arch: str = "resnet18_fpn"                 # ignored when `init` is given (the checkpoint has its own)
    scratch_model: dict = field(default_factory=lambda: copy.deepcopy(SCRATCH_MODEL))  # ModelConfig overrides
    model: dict = field(default_factory=dict)  # ModelConfig overrides applied last (scratch or fine-tune)
    init: str | None = None                    # weights to fine-tune from (any format maskrcnn.load reads)
    # length: exactly one of iters / epochs
    iters: int | None = None
    epochs: int | None = 30
    batch_size: int = 4                        # GLOBAL batch: split evenly across torchrun processes
    # optimisation. "auto": AdamW when training from scratch (it reached higher AP than SGD in the same 600
    # iterations on the shapes data, see benchmarks/README.md), SGD with momentum when fine-tuning.
    optimizer: str = "auto"                    # auto | sgd | adamw
    lr: float | None = None                    # None: 0.02 for SGD, 1e-3 for AdamW
    momentum: float = 0.9                      # SGD only
    weight_decay: float | None = None          # None: 1e-4 for SGD, 0.05 for AdamW
    no_decay_norm_and_bias: bool = True        # weight decay only on conv/linear weights
    warmup_iters: int = 100
    warmup_factor: float = 0.001               # lr starts at lr * warmup_factor, rises linearly
    # "auto": constant (with a short linear cool-down at the end) when training from scratch, cosine decay
    # when fine-tuning. From scratch, decaying the lr early cost AP on the shapes data: 600 iterations
    # reached segm AP 0.444 at a constant lr, 0.353 with the step decay and 0.305 with cosine decay
    # (benchmarks/README.md); the run is far from converged, and decay only stops its learning early.
    schedule: str = "auto"                     # auto | cosine | step | constant
    steps: tuple[float, ...] = (0.67, 0.89)    # step schedule: fractions of the run (< 1) or iterations
    gamma: float = 0.1                         # step schedule: lr factor at each step
    min_lr_factor: float = 0.0                 # cosine schedule: final lr = lr * min_lr_factor
    cooldown: float = 0.2                      # constant schedule: lr falls linearly to 0 over this last fraction
    ema_decay: float | None = None             # evaluate and save a moving average of the weights (e.g. 0.99)
    loss_weights: dict = field(default_factory=dict)  # e.g. {"loss_classifier": 2.0}; unnamed losses weigh 1
    grad_clip: float | None = 10.0             # max global gradient norm (None: no clipping)
    amp: bool = False                          # CUDA float16 autocast + GradScaler
    bf16: bool | None = None                   # bfloat16 autocast; None: on for CPUs with native bf16 (AVX512-BF16)
    # hardware
    device: str = "auto"                       # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    num_workers: int | None = None             # None: 0 on CPU (workers would take cores from the step), 2 on CUDA
    threads: int | None = None                 # torch CPU threads per process (None: torch's default)
    # training data pipeline (the model resizes only at evaluation time)
    min_sizes: tuple[int, ...] = (256,)        # shorter side, one picked at random per image
    max_size: int = 341
    flip: bool = True
    lsj: int | None = None                     # large scale jitter to a fixed square of this size instead
    lsj_scale: tuple[float, float] = (0.1, 2.0)
    # bookkeeping
    seed: int = 0
    checkpoint_every: int = 500
    eval_every: int | None = 1000              # also validates at the end when a val set is given
    log_every: int = 20
    eval_batch_size: int = 4

    def to_dict(self) -> dict:
        return plain(asdict(self))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        """Build from a dict (a YAML/JSON file, a checkpoint); unknown keys are an error naming them."""
        if not isinstance(data, dict):
            raise MaskRCNNError(f"{source}: must be a mapping of TrainConfig fields")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MaskRCNNError(f"{source}: unknown training settings {unknown}; known: {sorted(known)}")
        data = dict(data)
        for key in ("steps", "min_sizes", "lsj_scale"):
            if isinstance(data.get(key), (list, tuple)):
                data[key] = tuple(data[key])
            elif isinstance(data.get(key), (int, float)) and key != "lsj_scale":
                data[key] = (data[key],)
        problems = setting_problems(data)
        if problems:
            raise MaskRCNNError(f"{source}: " + "; ".join(problems))
        return cls(**data)


def setting_problems(data: dict) -> list[str]:
    """One sentence per TrainConfig setting in `data` that is out of range, model overrides included."""
    from ..modeling.model import model_setting_problems

    problems = check_fields(data, TRAIN_RULES, optional=OPTIONAL)
    weights = data.get("loss_weights") or {}
    if isinstance(weights, dict):
        problems += check_fields(weights, dict.fromkeys(weights, NON_NEGATIVE), prefix="loss_weights.")
    for key in ("model", "scratch_model"):
        if isinstance(data.get(key), dict):
            problems += [f"{key}: {p}" for p in model_setting_problems(data[key])]
    return problems


def plain(value):
    """Tuples -> lists, recursively, so the dict is clean YAML/JSON and loads with weights_only=True."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def config_with(base: "TrainConfig | dict", changes: dict, source: str = "settings") -> TrainConfig:
    """`base` with `changes` applied. Setting one of iters/epochs clears the other, so a config file or a
    command-line flag can switch how the run length is given."""
    data = base.to_dict() if isinstance(base, TrainConfig) else dict(base)
    changes = dict(changes)
    if changes.get("iters") is not None and "epochs" not in changes:
        changes["epochs"] = None
    if changes.get("epochs") is not None and "iters" not in changes:
        changes["iters"] = None
    data.update(changes)
    return TrainConfig.from_dict(data, source)


def load_config_file(path: str | os.PathLike) -> dict:
    """A YAML or JSON file whose keys are TrainConfig fields -> dict (validated by TrainConfig.from_dict)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MaskRCNNError(f"{path}: cannot read config file ({e.strerror or e})") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise MaskRCNNError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} "
                            f"({first_line(e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MaskRCNNError(f"{path}: must be a mapping of TrainConfig fields")
    TrainConfig.from_dict(data, str(path))  # fail early on unknown keys
    return data



def resolve_defaults(config: TrainConfig, device: torch.device) -> TrainConfig:
    """Fill the settings left to "auto" for this run and device; the run folder records the result."""
    optimizer = config.optimizer
    if optimizer == "auto":
        optimizer = "sgd" if config.init else "adamw"
    changes = {"optimizer": optimizer}
    if config.schedule == "auto":
        changes["schedule"] = "cosine" if config.init else "constant"
    if config.lr is None:
        changes["lr"] = 0.02 if optimizer == "sgd" else 1e-3
    if config.weight_decay is None:
        changes["weight_decay"] = 1e-4 if optimizer == "sgd" else 0.05
    if config.num_workers is None:
        # On CPU the data pipeline (~7 ms per 256-px image) is cheap next to a step, while worker processes
        # preempt the step's math threads: on 2 cores two workers made steps ~25% slower.
        changes["num_workers"] = 0 if device.type == "cpu" else 2
    if config.bf16 is None:
        from ..precision import cpu_has_native_bf16

        changes["bf16"] = device.type == "cpu" and not config.amp and cpu_has_native_bf16()
    return replace(config, **changes)


def check_config(c: TrainConfig) -> None:
    problems = setting_problems(asdict(c))
    if (c.iters is None) == (c.epochs is None):
        problems.append("set exactly one of iters and epochs")
    if c.optimizer not in ("auto", "sgd", "adamw"):
        problems.append(f"optimizer must be auto, sgd or adamw, got {c.optimizer!r}")
    if c.schedule not in ("auto", "cosine", "step", "constant"):
        problems.append(f"schedule must be auto, cosine, step or constant, got {c.schedule!r}")
    if c.amp and c.bf16 is True:
        problems.append("choose one of amp (float16) and bf16")
    unknown_losses = sorted(set(c.loss_weights) - set(LOSS_NAMES))
    if unknown_losses:
        problems.append(f"loss_weights: unknown losses {unknown_losses}; the losses are {list(LOSS_NAMES)}")
    if not problems:  # the ranges hold, so the values compare
        if not c.lsj and (not c.min_sizes or c.max_size < max(c.min_sizes)):
            problems.append("min_sizes must be given and max_size at least the largest of them")
        if not isinstance(c.lsj_scale, (list, tuple)) or len(c.lsj_scale) != 2 or c.lsj_scale[0] > c.lsj_scale[1]:
            problems.append(f"lsj_scale must be [smallest, largest] scale, got {c.lsj_scale}")
    if (c.val_annotations is None) != (c.val_images is None):
        problems.append("give both val_annotations and val_images, or neither")
    if problems:
        raise MaskRCNNError("bad training settings: " + "; ".join(problems))
