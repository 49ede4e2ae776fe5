"""Checkpoints in and out: torchvision state dicts, our own safetensors files, and named downloads.

Weights are only ever read as tensors (`torch.load(weights_only=True)` or safetensors): a checkpoint
from the internet cannot run code on the user's machine.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import warnings
import zipfile
from pathlib import Path

import torch

from .errors import MaskRCNNError, first_line
from .files import atomic_path
from .modeling.keypoints import COCO_PERSON_KEYPOINT_NAMES, COCO_PERSON_SKELETON
from .modeling.model import ARCHS, MaskRCNN, ModelConfig, arch_config
from .precision import AUTO, cpu_has_native_bf16, resolve_precision

# COCO 2017 category names by category id (ids 1..90; "N/A" where COCO left an id unused).
# Models trained on COCO with 91 outputs predict these ids directly.
COCO_CLASS_NAMES = [
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet",
    "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "N/A", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]

# name -> (url, leading hex digits of the file's SHA-256, as published in the file name)
REGISTRY = {
    "torchvision:maskrcnn_resnet50_fpn_coco": (
        "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth", "bf2d0c1e"),
    "torchvision:maskrcnn_resnet50_fpn_v2_coco": (
        "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth", "73cbd019"),
    "torchvision:keypointrcnn_resnet50_fpn_coco": (
        "https://download.pytorch.org/models/keypointrcnn_resnet50_fpn_coco-fc266e95.pth", "fc266e95"),
}

FORMAT_TAG = "maskrcnn.v1"

# torchvision key -> our key. Applied in order, first match wins. Older torchvision files (the published
# COCO v1 weights among them) name some layers differently; both spellings are listed.
_TORCHVISION_RULES = [
    (r"^backbone\.body\.", "backbone."),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.0\.", r"fpn.lateral.\1.conv."),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.1\.", r"fpn.lateral.\1.norm."),
    (r"^backbone\.fpn\.inner_blocks\.(\d+)\.(weight|bias)$", r"fpn.lateral.\1.conv.\2"),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.0\.", r"fpn.output.\1.conv."),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.1\.", r"fpn.output.\1.norm."),
    (r"^backbone\.fpn\.layer_blocks\.(\d+)\.(weight|bias)$", r"fpn.output.\1.conv.\2"),
    (r"^rpn\.head\.conv\.(\d+)\.0\.", r"rpn.head.conv.\1.conv."),
    (r"^rpn\.head\.conv\.(weight|bias)$", r"rpn.head.conv.0.conv.\1"),
    (r"^rpn\.head\.cls_logits\.", "rpn.head.objectness."),
    (r"^rpn\.head\.bbox_pred\.", "rpn.head.box_deltas."),
    (r"^roi_heads\.box_head\.fc6\.", "box_head.fc1."),
    (r"^roi_heads\.box_head\.fc7\.", "box_head.fc2."),
    (r"^roi_heads\.box_head\.(\d+)\.0\.", r"box_head.convs.\1.conv."),
    (r"^roi_heads\.box_head\.(\d+)\.1\.", r"box_head.convs.\1.norm."),
    (r"^roi_heads\.box_head\.(\d+)\.(weight|bias)$", r"box_head.fc.\2"),  # the Linear after the convs
    (r"^roi_heads\.box_predictor\.cls_score\.", "box_predictor.class_logits."),
    (r"^roi_heads\.box_predictor\.bbox_pred\.", "box_predictor.box_deltas."),
    (r"^roi_heads\.mask_head\.(\d+)\.0\.", r"mask_head.convs.\1.conv."),
    (r"^roi_heads\.mask_head\.(\d+)\.1\.", r"mask_head.convs.\1.norm."),
    (r"^roi_heads\.mask_head\.mask_fcn(\d+)\.", lambda m: f"mask_head.convs.{int(m.group(1)) - 1}.conv."),
    (r"^roi_heads\.mask_predictor\.conv5_mask\.", "mask_predictor.upsample."),
    (r"^roi_heads\.mask_predictor\.mask_fcn_logits\.", "mask_predictor.logits."),
    # Keypoint R-CNN: an nn.Sequential of (conv, ReLU) pairs, so conv i is entry 2 * i
    (r"^roi_heads\.keypoint_head\.(\d+)\.", lambda m: f"keypoint_head.convs.{int(m.group(1)) // 2}.conv."),
    (r"^roi_heads\.keypoint_predictor\.kps_score_lowres\.", "keypoint_predictor.upsample."),
]
_TORCHVISION_RULES = [(re.compile(p), r) for p, r in _TORCHVISION_RULES]


def is_torchvision_state_dict(state: dict) -> bool:
    return any(k.startswith("backbone.body.") for k in state) and any(k.startswith("roi_heads.") for k in state)


def from_torchvision(state: dict) -> dict[str, torch.Tensor]:
    """Rename a torchvision Mask R-CNN state dict to our module names; unknown keys are kept as they are
    (so they surface as 'unexpected keys' when loading)."""
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in _TORCHVISION_RULES:
            new, n = pattern.subn(repl, key)
            if n:
                break
        out[new] = value
    return out


def infer_config(state: dict[str, torch.Tensor], source: str = "checkpoint") -> ModelConfig:
    """Architecture and class count read off the keys and shapes of a state dict in our naming."""
    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise MaskRCNNError(f"{source}: not a Mask R-CNN checkpoint (missing {key!r})")
        return state[key]

    num_classes = need("box_predictor.class_logits.weight").shape[0]
    kp_weight = state.get("keypoint_predictor.upsample.weight")  # (channels, keypoints, 4, 4)
    keypoints = 0 if kp_weight is None else int(kp_weight.shape[1])
    masks = "mask_predictor.logits.weight" in state or not keypoints  # neither branch: "missing" names the mask
    per_class_rows = [("box_predictor.box_deltas.weight", 4)] + [("mask_predictor.logits.weight", 1)] * masks
    for key, per_class in per_class_rows:
        if need(key).shape[0] != num_classes * per_class:
            raise MaskRCNNError(f"{source}: inconsistent class counts: box classifier has {num_classes} "
                                f"classes but {key} has {need(key).shape[0] // per_class}")
    stage3 = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.layer3\.(\d+)\.", k))}
    bottleneck = "backbone.layer1.0.conv3.weight" in state
    depth = {(True, 6): 50, (True, 23): 101, (False, 2): 18, (False, 6): 34}.get((bottleneck, len(stage3)))
    if depth is None:
        raise MaskRCNNError(f"{source}: unsupported backbone ({len(stage3)} blocks in layer3)")
    if "box_head.convs.0.conv.weight" in state:
        base = arch_config("resnet50_fpn_v2", num_classes)
        base.depth = depth
    else:
        base = arch_config(f"resnet{depth}_fpn", num_classes)
    base.rpn_conv_depth = len({k.split(".")[3] for k in state if k.startswith("rpn.head.conv.")})
    base.fpn_norm = "bn" if "fpn.lateral.0.norm.weight" in state else None
    base.masks, base.keypoints = masks, keypoints
    if keypoints:
        base.keypoint_head_channels = int(kp_weight.shape[0])
        base.keypoint_head_convs = len({k.split(".")[2] for k in state if k.startswith("keypoint_head.convs.")})
        if keypoints == len(COCO_PERSON_KEYPOINT_NAMES):  # torchvision's files carry no names: COCO's persons
            base.keypoint_names, base.skeleton = COCO_PERSON_KEYPOINT_NAMES, COCO_PERSON_SKELETON
    if base.backbone_norm == "frozen_bn" and "backbone.bn1.num_batches_tracked" in state:
        # Saved from a trainable BatchNorm backbone (torchvision builds one when no pretrained backbone is
        # given): evaluate it with BatchNorm's own arithmetic, which rounds differently from frozen BN's.
        base.backbone_norm = "bn"
    return base


def default_class_names(num_classes: int, keypoints: int = 0) -> tuple[list[str], list[int]]:
    if num_classes == len(COCO_CLASS_NAMES):
        return list(COCO_CLASS_NAMES), list(range(num_classes))
    if num_classes == 2 and keypoints == len(COCO_PERSON_KEYPOINT_NAMES):  # torchvision's Keypoint R-CNN
        return ["__background__", "person"], [0, 1]
    return ["__background__"] + [f"class_{i}" for i in range(1, num_classes)], list(range(num_classes))


# ---------------------------------------------------------------------------------------------- our format

def save_checkpoint(model: MaskRCNN, path: str | os.PathLike) -> None:
    """Weights, config and class names in one safetensors file, written atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT_TAG, "config": json.dumps(model.config.to_dict()),
                "class_names": json.dumps(model.class_names), "category_ids": json.dumps(model.category_ids)}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt files
        raise MaskRCNNError(f"{path}: not a readable safetensors file ({e})") from None
    return state, metadata


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"  # 8-byte little-endian header length, then JSON


def _is_torchscript_archive(path: Path) -> bool:
    """A zip holding compiled code (TorchScript writes `code/` and `constants.pkl`; state dicts have neither)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _unreadable(path: Path, error: Exception) -> str:
    """Why torch.load(weights_only=True) refused `path`, in our words: torch's own text advises switching
    that safety off, which would run whatever code the file carries; we never give that advice."""
    from .export.runtime import is_exported_file

    if is_exported_file(path):
        return (f"{path}: a model file from `maskrcnn export`, not a checkpoint; `maskrcnn predict` and "
                "maskrcnn.Predictor run it (a TorchScript one only with --trust-torchscript / trust_torchscript=True)")
    text = str(error).strip()
    if "TorchScript" in text:
        return f"{path}: a TorchScript program, not a checkpoint; maskrcnn reads weights only as tensors"
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in text:
        return (f"{path}: not a PyTorch checkpoint that can be loaded safely: it holds Python objects besides "
                "tensors, and loading them would run code from the file; save the model's state_dict() instead")
    return f"{path}: not a PyTorch checkpoint that can be loaded safely ({first_line(error)})"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig, list[str], list[int]]:
    """Any supported file -> (state dict in our naming, config, class names, category ids)."""
    path = Path(path)
    if not path.is_file():
        raise MaskRCNNError(f"{path}: checkpoint file not found")
    if _looks_like_safetensors(path):
        state, meta = _read_safetensors(path)
        if meta.get("format") == FORMAT_TAG:
            try:
                config = ModelConfig.from_dict(json.loads(meta["config"]))
                names, ids = json.loads(meta["class_names"]), json.loads(meta["category_ids"])
            except (KeyError, ValueError, TypeError) as e:
                raise MaskRCNNError(f"{path}: damaged maskrcnn metadata ({e})") from None
            return state, config, names, ids
    else:
        if _is_torchscript_archive(path):  # refused before torch.load, which would hand it to torch.jit.load
            raise MaskRCNNError(_unreadable(path, RuntimeError("TorchScript archive")))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MaskRCNNError(_unreadable(path, e)) from None
        if isinstance(state, dict) and "model" in state and "config" in state:  # our training checkpoint
            try:
                config = ModelConfig.from_dict(state["config"])
            except (ValueError, TypeError) as e:
                raise MaskRCNNError(f"{path}: damaged model config ({e})") from None
            return (state["model"], config, state.get("class_names") or default_class_names(config.num_classes)[0],
                    state.get("category_ids") or list(range(config.num_classes)))
        if isinstance(state, dict) and isinstance(state.get("model"), dict):  # {"model": state_dict, ...}
            state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MaskRCNNError(f"{path}: not a state dict of tensors")
    if is_torchvision_state_dict(state):
        state = from_torchvision(state)
    config = infer_config(state, str(path))
    names, ids = default_class_names(config.num_classes, config.keypoints)
    return state, config, names, ids


def load_state(model: MaskRCNN, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict loading with an error that says what does not fit, instead of PyTorch's wall of text."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.endswith("num_batches_tracked") and k not in own)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:2])})")
    if problems:
        raise MaskRCNNError(f"{source}: checkpoint does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------- downloads

def registry_path(name: str) -> Path:
    url, _ = REGISTRY[name]
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def fetch(name: str, progress: bool = True) -> Path:
    """Path of a registered checkpoint, downloading it once into the torch hub cache (hash checked)."""
    if name not in REGISTRY:
        raise MaskRCNNError(f"unknown weights name {name!r}; known: {', '.join(sorted(REGISTRY))}")
    url, sha_prefix = REGISTRY[name]
    path = registry_path(name)
    if path.is_file():
        return path
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # torch.hub opens the url without a timeout of its own
    try:  # torch.hub writes a temp file beside `path`, checks the hash, then moves it into place
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), hash_prefix=sha_prefix, progress=progress)
    except RuntimeError as e:
        if "invalid hash value" not in str(e):
            raise
        raise MaskRCNNError(f"{url}: downloaded file is corrupt (SHA-256 does not start with {sha_prefix})") from None
    except (OSError, TimeoutError) as e:  # urllib's URLError is an OSError
        raise MaskRCNNError(f"cannot download {name} from {url} ({getattr(e, 'reason', e)}); without network, "
                            f"fetch that file elsewhere and put it at {path}") from None
    finally:
        socket.setdefaulttimeout(timeout)
    return path


# ---------------------------------------------------------------------------------------------- load

def load(source: str | os.PathLike, *, device: str | torch.device = "cpu", score_thresh: float = 0.05,
         nms_thresh: float = 0.5, detections_per_img: int = 100, precision: str = "fp32",
         mask_paste: str | None = None, proposals: int | None = None) -> MaskRCNN:
    """A ready-to-use model in eval mode from a checkpoint path or a registered name (see REGISTRY).

    Accepts torchvision Mask R-CNN state dicts (v1 or v2 layout, any class count, architecture read off
    the keys), torchvision Keypoint R-CNN ones (keypointrcnn_resnet50_fpn: boxes and keypoints, no masks;
    17 keypoints get COCO's person keypoint names and skeleton), our safetensors checkpoints and our
    training checkpoints. `precision="bf16"` trades
    exactness for speed (see MaskRCNN.precision); "auto" picks the fastest precision with agreement for the
    device (maskrcnn/precision.py). `mask_paste` overrides the checkpoint's way of pasting
    masks into the image ("exact" is sub-pixel, "torchvision" matches torchvision; see paste_masks).
    `proposals` overrides how many RPN proposals per image reach the box head (the checkpoint's
    `rpn.post_nms_top_n_test`: 1000 for torchvision's models, 100 for ours trained from scratch).
    """
    if precision not in (AUTO, *MaskRCNN.PRECISIONS):
        raise MaskRCNNError(f"precision must be one of {', '.join((AUTO, *MaskRCNN.PRECISIONS))}, "
                            f"got {precision!r}")
    src = str(source)
    if src in REGISTRY:
        path = fetch(src)
    elif ":" in src and not Path(src).exists() and not re.match(r"^[A-Za-z]:[\\/]", src):
        raise MaskRCNNError(f"unknown weights name {src!r}; known: {', '.join(sorted(REGISTRY))}")
    else:
        path = Path(src)
    state, config, class_names, category_ids = read_checkpoint(path)
    if len(class_names) != config.num_classes:
        raise MaskRCNNError(f"{path}: {len(class_names)} class names for a model with {config.num_classes} classes")
    config.score_thresh, config.nms_thresh, config.detections_per_img = score_thresh, nms_thresh, detections_per_img
    if mask_paste is not None:
        config.mask_paste = mask_paste
    if proposals is not None:
        config.rpn.post_nms_top_n_test = proposals  # checked with the other settings when the model is built
    try:
        model = MaskRCNN(config, class_names, category_ids)
    except ValueError as e:
        raise MaskRCNNError(f"{path}: {e}") from None
    load_state(model, state, str(path))
    model = model.to(device).eval()
    model.precision = precision = resolve_precision(precision, next(model.parameters()).device)
    if precision == "bf16" and next(model.parameters()).device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("this CPU has no native bfloat16 instructions (AVX512-BF16 / AMX): bf16 is emulated "
                      "here and much slower than fp32", stacklevel=2)
    return model


__all__ = ["load", "save_checkpoint", "read_checkpoint", "from_torchvision", "infer_config", "fetch", "REGISTRY",
           "COCO_CLASS_NAMES", "ARCHS"]
