"""The model a run trains: built from `arch` when training from scratch, or from `init` weights when
fine-tuning, with the class-dependent layers adapted to the training set's classes."""

from __future__ import annotations

import torch

from ..errors import MaskRCNNError
from .config import TrainConfig
from .seeds import _INIT, derive_seed

# Layers whose shape depends on the number of classes: re-initialised when fine-tuning to a new class set.
CLASS_DEPENDENT_KEYS = {
    "box_predictor.class_logits.weight": 1, "box_predictor.class_logits.bias": 1,
    "box_predictor.box_deltas.weight": 4, "box_predictor.box_deltas.bias": 4,
    "mask_predictor.logits.weight": 1, "mask_predictor.logits.bias": 1,
}


def build_training_model(config: TrainConfig, num_classes: int, class_names: list[str], category_ids: list[int],
                         keypoint_names=(), skeleton=()) -> tuple[torch.nn.Module, str]:
    """A model from `arch` (from scratch) or from `init` weights; returns it and a line saying what was done.

    With `keypoint_names` (the training set's) the model gets a keypoint head of that many keypoints
    (ModelConfig `keypoints`) and keeps the names and the `skeleton` (COCO's 1-based pairs) in its config."""
    from ..modeling.model import MaskRCNN, ModelConfig, arch_config
    from ..weights import load_state, read_checkpoint

    torch.manual_seed(derive_seed(config.seed, _INIT))
    size = _eval_image_size(config)
    keypoints = {"keypoints": len(keypoint_names), "keypoint_names": tuple(keypoint_names),
                 "skeleton": tuple(tuple(edge) for edge in skeleton)} if keypoint_names else {}
    if config.init is None:
        try:
            model_config = arch_config(config.arch, num_classes,
                                       **merge_model_options(config.scratch_model, size, config.model, keypoints))
            model = MaskRCNN(model_config, list(class_names), list(category_ids))
        except (TypeError, ValueError) as e:
            raise MaskRCNNError(f"bad model settings: {e}") from None
        return model, f"{config.arch} from scratch ({num_classes} classes)"

    state, init_config, init_names, _ = read_checkpoint(config.init)
    options = merge_model_options(init_config.to_dict(), size, config.model, {"num_classes": num_classes}, keypoints)
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
    keys = {k: n for k, n in CLASS_DEPENDENT_KEYS.items() if k in fresh}  # a model may have no mask branch
    lookup = {name: i for i, name in enumerate(init_names)}
    rows = [lookup.get(name) for name in names]
    if len(set(init_names)) == len(init_names) and None not in rows and all(state.get(k) is not None for k in keys):
        index = torch.tensor(rows)
        for key, per_class in keys.items():
            expanded = (index[:, None] * per_class + torch.arange(per_class)).reshape(-1)
            state[key] = state[key][expanded].clone()
        return state, f"class layers: {len(names) - 1} classes matched by name"
    for key in keys:
        state[key] = fresh[key]
    return state, f"class layers re-initialised for {len(names) - 1} classes (checkpoint had {len(init_names) - 1})"


def _eval_image_size(config: TrainConfig) -> dict:
    """The model resizes at evaluation time to the scale it was trained at (unless `model` says otherwise)."""
    if config.lsj:
        return {"min_size": int(config.lsj), "max_size": int(config.lsj)}
    return {"min_size": int(max(config.min_sizes)), "max_size": int(config.max_size)}
