"""The training loop: SGD with warm-up and decay, checkpoints you can resume bit-exactly, validation with
COCO AP, and the same code on one CPU or N processes under torchrun.

Reproducibility rests on one rule: every random choice is a pure function of the run seed and *where*
in the run it happens, never of what ran before in the process:

    data order        AspectRatioGroupedBatches.epoch_batches(epoch)        seeded by (seed, epoch)
    augmentation      CocoDataset(augment_seed=...) + set_epoch(epoch)      seeded by (seed, epoch, image index)
    model sampling    one generator per image                               seeded by (seed, iteration, position
                                                                            of the image in the GLOBAL batch)
    anything else     torch.manual_seed(...) before each step               seeded by (seed, iteration)

So a resumed run replays exactly what an uninterrupted run would have done from the checkpoint's
iteration on, and N processes with B images each sample exactly what one process with N*B images does.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..checks import NON_NEGATIVE, check_fields
from ..data.augment import derive_seed
from ..errors import MaskRCNNError
from . import distributed
from .checkpoint import TRAIN_FORMAT_TAG, atomic_torch_save, read_training_checkpoint
from .ema import WeightAverage
from .train_rules import OPTIONAL, TRAIN_RULES

# Independent random streams derived from the one run seed (see the module docstring).
_DATA_ORDER, _AUGMENT, _SAMPLING, _STEP, _INIT = 1, 2, 3, 4, 5

# Layers whose shape depends on the number of classes: re-initialised when fine-tuning to a new class set.
CLASS_DEPENDENT_KEYS = {
    "box_predictor.class_logits.weight": 1, "box_predictor.class_logits.bias": 1,
    "box_predictor.box_deltas.weight": 4, "box_predictor.box_deltas.bias": 4,
    "mask_predictor.logits.weight": 1, "mask_predictor.logits.bias": 1,
}

# What the model returns in training mode (maskrcnn/modeling/losses.py), the keys of loss_weights.
LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")

# Settings that change what a run computes; changing one on --resume means the run no longer matches an
# uninterrupted one (allowed, e.g. to extend a run, but reported).
_RECIPE_FIELDS = ("train_annotations", "arch", "model", "scratch_model", "init", "iters", "epochs", "batch_size",
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
    scratch_model: dict = field(default_factory=lambda: {  # ModelConfig overrides for training from scratch
        # BatchNorm in the backbone (statistics over the 4 images of a batch) learned faster than GroupNorm
        # in 600 iterations (segm AP 0.258 -> 0.308, benchmarks/README.md) and folds into the convolutions
        # at inference. In the FPN and the mask head too it was ~5% faster per step than GroupNorm, at the
        # same or slightly higher AP (benchmarks/README.md). Under torchrun on CPU each process normalises
        # over its own images (SyncBatchNorm is CUDA-only); set the four norms to "gn" where several CPU
        # processes must match one process exactly. BatchNorm after each layer of the box head too: the
        # classifier started telling the shapes apart earlier (segm AP 0.468 -> 0.508 and 0.499 -> 0.526
        # on two training seeds, benchmarks/README.md).
        "backbone_norm": "bn", "fpn_norm": "bn", "head_norm": "bn", "mlp_head_norm": "bn", "frozen_stages": 0,
        # CPU-friendly heads: convolutions at stride 4 and the mask head dominate a step's cost
        "fpn_channels": 128, "mask_head_channels": 128, "box_batch_size_per_image": 128,
        # half of the RoIs positive: the box classifier is what lags behind when training from scratch
        # (segm AP 0.241 -> 0.258 on the shapes data, benchmarks/README.md). The mask head's cost grows with
        # every positive, and the positives are near-copies of a few objects: 16 per image instead of 32
        # made a trained model's step 1.26x faster for segm AP 0.488 -> 0.468 (benchmarks/README.md)
        "box_positive_fraction": 0.5, "mask_rois_per_image": 16,
        # separate layers for the class scores and the box deltas, and jittered copies of every object's
        # box among the proposals: both get the classifier going sooner (benchmarks/README.md)
        "box_head": "split_mlp", "gt_jitter_copies": 10,
        # 4x4 sample points per box-head bin instead of torchvision's 2x2: at ~256 px nearly every object is
        # pooled from P2, where a 100 px box's bins are 3.5 cells wide and 2 points per side skip cells
        # (segm AP +0.044 and +0.031 on two training seeds, benchmarks/README.md). Since the sparse RoIAlign
        # keeps one weight per feature cell, not per point, a step costs the same as with 2x2 points.
        "box_sampling_ratio": 4,
        # masks pasted to the sub-pixel, not onto whole pixels as torchvision does (segm AP +0.03 from the
        # same weights, benchmarks/README.md)
        "mask_paste": "exact",
        # anchors for objects of 10-200 px (small images); the COCO sizes start at 32 px
        "anchor_sizes": [16, 32, 64, 128, 256],
        # 1000 candidates per level are plenty at ~256 px (P3 has ~4k anchors); NMS cost grows with n^2.
        # At test time 100 proposals per image instead of 1000: on five trained models the same weights gave
        # higher AP with 100 than with 300 or 1000 (benchmarks/README.md), and the box head's cost at
        # evaluation falls with them. At most ~100 objects per image then: raise it for crowded images
        # (`--model-option rpn.post_nms_top_n_test=1000`, or `maskrcnn eval --proposals 1000`).
        "rpn": {"pre_nms_top_n_train": 1000, "post_nms_top_n_train": 1000, "post_nms_top_n_test": 100},
    })
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
        return _plain(asdict(self))

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


def _plain(value):
    """Tuples -> lists, recursively, so the dict is clean YAML/JSON and loads with weights_only=True."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
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
                            f"({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MaskRCNNError(f"{path}: must be a mapping of TrainConfig fields")
    TrainConfig.from_dict(data, str(path))  # fail early on unknown keys
    return data


# ---------------------------------------------------------------------------------------------- seeds

def sampling_generators(seed: int, iteration: int, positions: range, device: torch.device) -> list[torch.Generator]:
    """One generator per image, keyed by the image's position in the global batch (not in this process's
    slice), so splitting the batch across processes changes nothing."""
    out = []
    for position in positions:
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(seed, _SAMPLING, iteration, position))
        out.append(g)
    return out


# ---------------------------------------------------------------------------------------------- schedule

def lr_factor(iteration: int, total_iters: int, config: TrainConfig) -> float:
    """Multiplier of the base lr at `iteration` (0-based): linear warm-up times step or cosine decay."""
    factor = 1.0
    if iteration < config.warmup_iters:
        alpha = iteration / config.warmup_iters
        factor = config.warmup_factor * (1 - alpha) + alpha
    if config.schedule == "step":
        milestones = [round(s * total_iters) if s < 1 else int(s) for s in config.steps]
        factor *= config.gamma ** sum(iteration >= m for m in milestones)
    elif config.schedule == "cosine":
        progress = min(iteration / max(total_iters, 1), 1.0)
        factor *= config.min_lr_factor + (1 - config.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    elif config.schedule == "constant" and config.cooldown > 0:
        remaining = (total_iters - iteration) / (config.cooldown * total_iters)
        factor *= min(1.0, max(remaining, 0.0))
    return factor


def param_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """Weight decay on conv/linear weights only: decaying norm scales and biases just fights the norm."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if config.no_decay_norm_and_bias and param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


# ---------------------------------------------------------------------------------------------- data

def training_transforms(config: TrainConfig):
    from ..data.augment import Compose, LargeScaleJitter, RandomHorizontalFlip, ResizeShortestSide

    steps = []
    if config.flip:
        steps.append(RandomHorizontalFlip(0.5))
    if config.lsj:
        steps.append(LargeScaleJitter(config.lsj, tuple(config.lsj_scale)))
    else:
        steps.append(ResizeShortestSide(tuple(config.min_sizes), config.max_size))
    return Compose(steps)


def _open_dataset(annotations: str, images: str, what: str, **kwargs):
    from ..data.coco import CocoDataset

    if not annotations or not images:
        raise MaskRCNNError(f"{what} set needs both an annotation file and an image folder")
    if not Path(images).is_dir():
        raise MaskRCNNError(f"{images}: {what} image folder not found")
    dataset = CocoDataset(annotations, images, **kwargs)
    missing = dataset.check_files()
    if missing:
        raise MaskRCNNError(f"{missing[0]}: image file not found ({len(missing)} of the {len(dataset)} images "
                            f"listed in {annotations} are missing)")
    return dataset


def _eval_image_size(config: TrainConfig) -> dict:
    """The model resizes at evaluation time to the scale it was trained at (unless `model` says otherwise)."""
    if config.lsj:
        return {"min_size": int(config.lsj), "max_size": int(config.lsj)}
    return {"min_size": int(max(config.min_sizes)), "max_size": int(config.max_size)}


def _worker_error_message(error: Exception) -> str:
    """DataLoader workers re-raise with the whole traceback in the message; keep the user-facing line."""
    text = str(error)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if last.startswith(("maskrcnn.errors.MaskRCNNError", "MaskRCNNError")) else last
    return text


# ---------------------------------------------------------------------------------------------- model

def build_training_model(config: TrainConfig, num_classes: int, class_names: list[str],
                         category_ids: list[int]) -> tuple[torch.nn.Module, str]:
    """A model from `arch` (from scratch) or from `init` weights; returns it and a line saying what was done."""
    from ..modeling.model import MaskRCNN, ModelConfig, arch_config
    from ..weights import load_state, read_checkpoint

    torch.manual_seed(derive_seed(config.seed, _INIT))
    size = _eval_image_size(config)
    if config.init is None:
        try:
            model_config = arch_config(config.arch, num_classes,
                                       **merge_model_options(config.scratch_model, size, config.model))
            model = MaskRCNN(model_config, list(class_names), list(category_ids))
        except (TypeError, ValueError) as e:
            raise MaskRCNNError(f"bad model settings: {e}") from None
        return model, f"{config.arch} from scratch ({num_classes} classes)"

    state, init_config, init_names, _ = read_checkpoint(config.init)
    options = merge_model_options(init_config.to_dict(), size, config.model, {"num_classes": num_classes})
    try:
        model = MaskRCNN(ModelConfig.from_dict(options), list(class_names), list(category_ids))
    except (TypeError, ValueError) as e:
        raise MaskRCNNError(f"bad model settings: {e}") from None
    note = f"fine-tuning {config.init}"
    if init_config.num_classes != num_classes or list(init_names) != list(class_names):
        state, how = _adapt_class_layers(state, model.state_dict(), list(init_names), list(class_names))
        note += f" ({how})"
    load_state(model, state, str(config.init))
    return model, note


def merge_model_options(*layers: dict) -> dict:
    """Later dicts override earlier ones; the nested `rpn` settings merge key by key."""
    merged: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if key == "rpn" and isinstance(value, dict):
                merged["rpn"] = {**(merged.get("rpn") or {}), **value}
            else:
                merged[key] = value
    return merged


def _adapt_class_layers(state: dict, fresh: dict, init_names: list[str], names: list[str]) -> tuple[dict, str]:
    """Class-dependent rows for the new class list: taken from the checkpoint's rows of the same class name
    when every new class exists there (e.g. COCO weights -> a COCO subset), freshly initialised otherwise.
    Everything else is kept."""
    state = dict(state)
    lookup = {name: i for i, name in enumerate(init_names)}
    rows = [lookup.get(name) for name in names]
    if (len(set(init_names)) == len(init_names) and None not in rows
            and all(state.get(k) is not None for k in CLASS_DEPENDENT_KEYS)):
        index = torch.tensor(rows)
        for key, per_class in CLASS_DEPENDENT_KEYS.items():
            expanded = (index[:, None] * per_class + torch.arange(per_class)).reshape(-1)
            state[key] = state[key][expanded].clone()
        return state, f"class layers: {len(names) - 1} classes matched by name"
    for key in CLASS_DEPENDENT_KEYS:
        state[key] = fresh[key]
    return state, f"class layers re-initialised for {len(names) - 1} classes (checkpoint had {len(init_names) - 1})"


# ---------------------------------------------------------------------------------------------- training

def train(config: TrainConfig, *, resume: bool = False, stop_after: int | None = None,
          progress: bool = True) -> dict:
    """Train as `config` says; returns a summary (iterations, last logged losses, validation metrics, paths).

    resume: continue from RUN_DIR/last.pt (the config should be the one the run started with).
    stop_after: end the process's work after this many iterations, as if killed there (for tests).
    """
    _check_config(config)
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    info, device = distributed.setup(config.device)
    finished = False
    try:
        summary = _Trainer(resolve_defaults(config, device), info, device, resume, progress).run(stop_after)
        finished = True
        return summary
    finally:
        distributed.cleanup(finished)
        torch.set_num_threads(threads_before)


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
        from ..weights import cpu_has_native_bf16

        changes["bf16"] = device.type == "cpu" and not config.amp and cpu_has_native_bf16()
    return replace(config, **changes)


def _check_config(c: TrainConfig) -> None:
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


class _Trainer:
    """One run's state. Only rank 0 (`self.main`) touches the file system or the terminal."""

    def __init__(self, config: TrainConfig, info: distributed.ProcessInfo, device: torch.device, resume: bool,
                 progress: bool):
        self.config = config
        self.info = info
        self.main = info.is_main
        self.device = device
        self.progress = progress and self.main
        self.run_dir = Path(config.out)
        if config.batch_size % info.world_size:
            raise MaskRCNNError(f"batch size {config.batch_size} does not split evenly over "
                                f"{info.world_size} processes")
        self.per_process = config.batch_size // info.world_size
        if config.amp and device.type != "cuda":
            raise MaskRCNNError("amp (float16 autocast) needs a CUDA device; use bf16 on CPU")

        self._open_data()
        self.model, self.model_note = build_training_model(config, self.dataset.num_classes,
                                                           self.dataset.class_names, self.dataset.category_ids)
        self.model.transform.resize_in_training = False  # the data pipeline owns training-time resizing
        self.model.to(device)
        self.model.train()
        # fused: one kernel over all parameters (3x faster than the per-tensor loop on CPU)
        fused = device.type in ("cpu", "cuda")
        if config.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(param_groups(self.model, config), lr=config.lr, fused=fused)
        else:
            self.optimizer = torch.optim.SGD(param_groups(self.model, config), lr=config.lr, momentum=config.momentum,
                                             fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: lr_factor(it, self.total_iters, config))
        self.scaler = torch.amp.GradScaler("cuda") if config.amp else None
        self.autocast = contextlib.nullcontext()
        if config.amp:
            self.autocast = torch.autocast("cuda", dtype=torch.float16)
        elif config.bf16:
            self.autocast = torch.autocast(device.type, dtype=torch.bfloat16)
        self.ema = WeightAverage(self.model, config.ema_decay) if config.ema_decay else None
        self.start_iter = 0
        self.best_metric: float | None = None
        self.best_iteration: int | None = None
        self.last_eval: dict | None = None
        self.last_losses: dict | None = None
        if resume:
            self._resume()

        self.trained = self.model
        if info.distributed:
            if self.model.config.backbone_norm == "bn" and device.type == "cuda":
                self.trained = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.trained = torch.nn.parallel.DistributedDataParallel(
                self.trained, device_ids=[device.index] if device.type == "cuda" else None)
        self.tensorboard = None

    @property
    def final_model(self) -> torch.nn.Module:
        """What is evaluated and saved: the weight average when there is one."""
        return self.ema.model if self.ema is not None else self.model

    # -- setup -------------------------------------------------------------------------------------

    def _open_data(self) -> None:
        from ..data.augment import AspectRatioGroupedBatches

        c = self.config
        self.dataset = _open_dataset(c.train_annotations, c.train_images, "training", skip_invalid=c.skip_invalid,
                                     transforms=training_transforms(c), augment_seed=derive_seed(c.seed, _AUGMENT))
        if len(self.dataset) == 0:
            raise MaskRCNNError(f"{c.train_annotations}: the training set has no images")
        skipped = sum(self.dataset.skipped.values())  # crowd regions, degenerate boxes, empty masks
        if len(self.dataset.coco.anns) - skipped <= 0:
            raise MaskRCNNError(f"{c.train_annotations}: the training set has no usable (non-crowd) instances")
        try:
            self.batches = AspectRatioGroupedBatches(self.dataset.aspect_ratios, c.batch_size,
                                                     derive_seed(c.seed, _DATA_ORDER))
        except ValueError as e:
            raise MaskRCNNError(f"{c.train_annotations}: too few images for batch size {c.batch_size} ({e})") from None
        self.iters_per_epoch = len(self.batches)
        self.total_iters = c.iters if c.iters is not None else c.epochs * self.iters_per_epoch
        self.val_dataset = None
        if c.val_annotations and self.main:
            self.val_dataset = _open_dataset(c.val_annotations, c.val_images, "validation",
                                             skip_invalid=c.skip_invalid)
            if self.val_dataset.category_ids != self.dataset.category_ids:
                raise MaskRCNNError(f"{c.val_annotations}: categories differ from the training set's "
                                    f"({c.train_annotations})")

    def _resume(self) -> None:
        path = self.run_dir / "last.pt"
        state = read_training_checkpoint(path)
        from ..weights import load_state

        saved = state.get("train_config", {})
        current = self.config.to_dict()
        changed = [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in _RECIPE_FIELDS
                   if k in saved and saved.get(k) != current[k]]
        if changed and self.main:
            print(f"warning: resuming {path} with changed settings ({'; '.join(changed)}); the result will differ "
                  f"from an uninterrupted run", file=sys.stderr)
        load_state(self.model, state["model"], str(path))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None:
                if state.get("ema") is None:
                    raise KeyError("no weight average (ema) in the checkpoint")
                self.ema.load_state_dict(state["ema"])
        except (ValueError, KeyError) as e:
            raise MaskRCNNError(f"{path}: optimizer state does not fit this run ({e})") from None
        self.start_iter = int(state["iteration"])
        self.best_metric = state.get("best_metric")
        self.best_iteration = state.get("best_iteration")
        self.last_eval = state.get("last_eval")

    # -- data --------------------------------------------------------------------------------------

    def _local_batches(self, start: int):
        """(images, targets) for iterations start, start+1, ...: this process's slice of each global batch."""
        from ..data.coco import collate

        epoch, skip = divmod(start, self.iters_per_epoch)
        rank, per = self.info.rank, self.per_process
        while True:
            self.dataset.set_epoch(epoch)  # before the loader copies the dataset into its workers
            local = [batch[rank * per:(rank + 1) * per] for batch in self.batches.epoch_batches(epoch)[skip:]]
            loader = DataLoader(self.dataset, batch_sampler=local, collate_fn=collate,
                                num_workers=self.config.num_workers, generator=torch.Generator().manual_seed(0),
                                pin_memory=self.device.type == "cuda")
            try:
                yield from loader
            except MaskRCNNError as e:
                raise MaskRCNNError(_worker_error_message(e)) from None
            epoch, skip = epoch + 1, 0

    def _to_device(self, images, targets):
        d = self.device
        images = [im.to(d, non_blocking=True) for im in images]
        targets = [{k: (v.to(d, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                   for t in targets]
        return images, targets

    # -- the loop ----------------------------------------------------------------------------------

    def run(self, stop_after: int | None) -> dict:
        c = self.config
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._write_config()
            self._prepare_metrics_log()
            self._open_tensorboard()
            params = sum(p.numel() for p in self.model.parameters())
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            where = f"{self.info.world_size} processes x {self.per_process} images" if self.info.distributed \
                else f"batch {c.batch_size}"
            print(f"{self.model_note}; {params / 1e6:.1f}M parameters ({trainable / 1e6:.1f}M trainable); "
                  f"{len(self.dataset)} training images, {self.iters_per_epoch} iterations/epoch; "
                  f"{self.total_iters} iterations, {where} on {self.device}"
                  + (f"; resuming at iteration {self.start_iter}" if self.start_iter else ""), flush=True)

        from tqdm import tqdm

        bar = tqdm(total=self.total_iters, initial=self.start_iter, disable=not self.progress, unit="it",
                   dynamic_ncols=True, desc="train")
        end = self.total_iters if stop_after is None else min(self.total_iters, stop_after)
        window: list[torch.Tensor] = []
        window_start = time.perf_counter()
        data_time = 0.0
        smoothed = None
        run_start = time.perf_counter()
        iteration = self.start_iter
        loss_names: list[str] = []
        batches = self._local_batches(self.start_iter) if self.start_iter < end else iter(())
        try:
            while iteration < end:
                fetch_start = time.perf_counter()
                images, targets = next(batches)
                images, targets = self._to_device(images, targets)
                data_time += time.perf_counter() - fetch_start

                lr = self.optimizer.param_groups[0]["lr"]
                loss_names, reduced, grad_norm = self.step(images, targets, iteration)
                iteration += 1

                window.append(reduced)
                total_value = float(reduced.sum())
                smoothed = total_value if smoothed is None else 0.9 * smoothed + 0.1 * total_value
                bar.update(1)
                bar.set_postfix(loss=f"{smoothed:.3f}", lr=f"{lr:.2e}", refresh=False)

                if iteration % c.log_every == 0 or iteration == self.total_iters:
                    now = time.perf_counter()
                    self._log_train(iteration, loss_names, window, lr, grad_norm,
                                    (now - window_start) / len(window), data_time / len(window))
                    window, window_start, data_time = [], now, 0.0
                side_work = time.perf_counter()
                evaluate_now = self.config.val_annotations and (
                    iteration == self.total_iters or (c.eval_every and iteration % c.eval_every == 0))
                if evaluate_now:
                    self._evaluate(iteration, bar)
                if iteration % c.checkpoint_every == 0 or iteration == self.total_iters:
                    self._on_main(lambda: self._save_last(iteration))
                window_start += time.perf_counter() - side_work  # time_per_iter counts training steps only
        finally:
            bar.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
            if hasattr(batches, "close"):
                batches.close()  # shut down DataLoader workers now, not at garbage collection

        done = iteration >= self.total_iters
        seconds = time.perf_counter() - run_start
        if done:
            self._on_main(self._finish)
        summary = {
            "run_dir": str(self.run_dir),
            "iterations": iteration,
            "total_iters": self.total_iters,
            "completed": done,
            "seconds": seconds,
            "seconds_per_iter": seconds / max(iteration - self.start_iter, 1),
            "last_losses": self.last_losses,
            "last_eval": self.last_eval,
            "best_segm_ap": self.best_metric,
            "best_iteration": self.best_iteration,
            "checkpoint": str(self.run_dir / "last.pt"),
            "weights": str(self.run_dir / "model.safetensors") if done else None,
            "best_weights": str(self.run_dir / "best.safetensors") if self.best_metric is not None else None,
        }
        if self.main and done:
            ap = ""
            if self.last_eval:
                ap = f"; val bbox AP {self.last_eval['bbox']['AP']:.3f}, segm AP {self.last_eval['segm']['AP']:.3f}"
            print(f"done: {iteration} iterations in {seconds / 60:.1f} min{ap}; weights in "
                  f"{self.run_dir / 'model.safetensors'}", flush=True)
        return summary

    def step(self, images, targets, iteration: int) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
        """One optimisation step at `iteration` (0-based): forward, backward, update, weight average and lr.
        Returns the loss names, the losses averaged over processes, and the gradient norm (when clipping)."""
        c = self.config
        torch.manual_seed(derive_seed(c.seed, _STEP, iteration))
        first = self.info.rank * self.per_process
        generators = sampling_generators(c.seed, iteration, range(first, first + len(images)), self.device)
        with self.autocast:
            losses = self.trained(images, targets, generators=generators)
        loss_names = list(losses)
        total = sum(v * c.loss_weights.get(k, 1.0) for k, v in losses.items())
        # Each process divides its partial sums by (global count / processes), so the mean over
        # processes is the global batch loss. Every process sees the same numbers: all stop together.
        reduced = distributed.sum_across_processes(
            torch.stack([v.detach().float() for v in losses.values()]).cpu()) / self.info.world_size
        if not torch.isfinite(reduced).all():
            detail = ", ".join(f"{n}={v:.4g}" for n, v in zip(loss_names, reduced.tolist()))
            last = self.run_dir / "last.pt"
            raise MaskRCNNError(
                f"non-finite loss at iteration {iteration + 1} ({detail}); stopped without saving "
                f"(last good checkpoint: {last if last.is_file() else 'none'}); try a lower lr, "
                f"a longer warm-up or grad_clip")

        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = None
        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
            if c.grad_clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            if c.grad_clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.scheduler.step()
        return loss_names, reduced, grad_norm

    def _on_main(self, work) -> None:
        """Run `work` on rank 0 while the others wait; an error there is raised on every process
        (instead of leaving the others stuck at the barrier)."""
        error = None
        if self.main:
            try:
                work()
            except Exception as e:
                error = e
        if not self.info.distributed:
            if error is not None:
                raise error
            return
        message = distributed.broadcast_object(None if error is None else str(error) or type(error).__name__)
        if error is not None:
            raise error
        if message is not None:
            raise MaskRCNNError(f"stopped because the main process failed: {message}")

    # -- outputs -----------------------------------------------------------------------------------

    def _write_config(self) -> None:
        import yaml

        text = yaml.safe_dump(self.config.to_dict(), sort_keys=False)
        tmp = self.run_dir / "config.yaml.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.run_dir / "config.yaml")

    def _prepare_metrics_log(self) -> None:
        """On resume, drop records written after the checkpoint: those iterations are about to be redone."""
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if not self.metrics_path.exists():
            return
        if self.start_iter == 0:
            self.metrics_path.unlink()
            return
        from .plots import read_metrics

        kept = [r for r in read_metrics(self.metrics_path) if r.get("iteration", 0) <= self.start_iter]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.metrics_path)

    def _open_tensorboard(self) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is optional
            return
        self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.start_iter or None)

    def _append_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _log_train(self, iteration, names, window, lr, grad_norm, time_per_iter, data_time) -> None:
        mean = torch.stack(window).mean(0).tolist()
        self.last_losses = {"loss": sum(mean), **dict(zip(names, mean))}
        if not self.main:
            return
        record = {"type": "train", "iteration": iteration, "loss": sum(mean), **dict(zip(names, mean)), "lr": lr,
                  "time_per_iter": time_per_iter, "data_time": data_time}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        self._append_metrics(record)
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("type", "iteration"):
                    self.tensorboard.add_scalar(f"train/{key}", value, iteration)

    def _evaluate(self, iteration: int, bar) -> None:
        def work():
            metrics = evaluate_model(self.final_model, self.val_dataset, self.device, self.config.eval_batch_size)
            summary = {task: metrics[task] for task in ("bbox", "segm") if task in metrics}
            self.last_eval = {"iteration": iteration, **summary}
            self._append_metrics({"type": "eval", "iteration": iteration, **summary})
            if self.tensorboard is not None:
                for task, values in summary.items():
                    for key, value in values.items():
                        self.tensorboard.add_scalar(f"val/{task}_{key}", value, iteration)
            ap = summary["segm"]["AP"]
            bar.write(f"iteration {iteration}: val bbox AP {summary['bbox']['AP']:.4f}, segm AP {ap:.4f}")
            if self.best_metric is None or ap > self.best_metric:
                from ..weights import save_checkpoint

                self.best_metric, self.best_iteration = float(ap), iteration
                save_checkpoint(self.final_model, self.run_dir / "best.safetensors")

        self._on_main(work)
        # Other processes learn the best metric too, so their view of the run stays consistent.
        self.best_metric, self.best_iteration = distributed.broadcast_object((self.best_metric, self.best_iteration))

    def _save_last(self, iteration: int) -> None:
        model = self.model
        state = {
            "format": TRAIN_FORMAT_TAG,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "config": _plain(model.config.to_dict()),
            "class_names": list(model.class_names),
            "category_ids": [int(i) for i in model.category_ids],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "iteration": iteration,
            "train_config": self.config.to_dict(),
            "best_metric": self.best_metric,
            "best_iteration": self.best_iteration,
            "last_eval": self.last_eval,
        }
        atomic_torch_save(state, self.run_dir / "last.pt")

    def _finish(self) -> None:
        from ..weights import save_checkpoint
        from .plots import plot_curves

        save_checkpoint(self.final_model, self.run_dir / "model.safetensors")
        try:
            plot_curves(self.metrics_path, self.run_dir / "curves.png")
        except Exception as e:  # a plotting problem must not lose a finished run
            print(f"warning: could not draw {self.run_dir / 'curves.png'} ({e})", file=sys.stderr)


def evaluate_model(model, dataset, device: torch.device, batch_size: int = 4) -> dict:
    """COCO bbox + segm metrics of `model` on a CocoDataset; leaves the model in the mode it found it."""
    from .evaluate import coco_evaluate, predict_dataset

    was_training = model.training
    model.eval()
    try:
        results = predict_dataset(model, dataset, category_ids=model.category_ids, batch_size=batch_size,
                                  device=device, progress=False)
        return coco_evaluate(dataset.coco, results, iou_types=("bbox", "segm"), verbose=False)
    finally:
        model.train(was_training)


__all__ = ["TrainConfig", "train", "config_with", "load_config_file", "build_training_model", "lr_factor", "evaluate_model"]
