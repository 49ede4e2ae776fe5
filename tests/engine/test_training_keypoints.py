"""Training plumbing for keypoints: the training set's keypoint names reach the flips and the model (its
`keypoints` ModelConfig switch, `keypoint_names`, `skeleton`), and mismatched keypoints are refused."""

from __future__ import annotations

import json

import pytest
import torch

from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.synthetic import make_shapes
from maskrcnn.engine.train import TrainConfig, build_training_model, config_with
from maskrcnn.engine.training_data import open_training_data
from maskrcnn.errors import MaskRCNNError

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

NAMES = ["head", "left_hand", "right_hand", "left_foot", "right_foot"]


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("figures"), num_train=4, num_val=2, size=64, seed=2, progress=False,
                       keypoints=True)


def _config(figures, **changes) -> TrainConfig:
    config = TrainConfig(train_annotations=figures["train_annotations"], train_images=figures["train_images"],
                         val_annotations=figures["val_annotations"], val_images=figures["val_images"],
                         iters=1, epochs=None, batch_size=1, min_sizes=(64,), max_size=86, num_workers=0,
                         device="cpu", flip=True)
    return config_with(config, changes)


def test_training_flips_swap_the_datasets_left_and_right_keypoints(figures):
    data = open_training_data(_config(figures), main=True)
    flip = data.dataset.transforms.transforms[0]
    assert flip.keypoint_order == [0, 2, 1, 4, 3]
    raw = CocoDataset(figures["train_annotations"], figures["train_images"])  # 64-pixel images: resized x1
    flipped = pairs = 0
    for epoch in range(4):  # the seeded stream flips about half of the items
        data.dataset.set_epoch(epoch)
        for index in range(len(data.dataset)):
            _, target = data.dataset[index]
            keypoints = target["keypoints"]
            assert keypoints.shape == (len(target["boxes"]), 5, 3)
            flipped += not torch.equal(keypoints, raw[index][1]["keypoints"])
            both = (keypoints[:, 1, 2] > 0) & (keypoints[:, 2, 2] > 0)
            assert (keypoints[both, 1, 0] < keypoints[both, 2, 0]).all()  # left hand still on the left
            pairs += int(both.sum())
    assert flipped >= 2 and pairs > 4
    assert data.val_dataset.keypoint_names == NAMES


def _rewrite(path: str, out, change) -> str:
    data = json.loads(open(path).read())
    change(data)
    out.write_text(json.dumps(data))
    return str(out)


def test_a_left_keypoint_without_a_right_one_is_refused_when_flipping(figures, tmp_path):
    def rename(data):
        data["categories"][0]["keypoints"][2] = "right_paw"
    annotations = _rewrite(figures["train_annotations"], tmp_path / "train.json", rename)
    with pytest.raises(MaskRCNNError, match=rf"^{annotations}: keypoint 'left_hand' has no 'right_hand' to swap"):
        open_training_data(_config(figures, train_annotations=annotations, val_annotations=None), main=True)
    data = open_training_data(_config(figures, train_annotations=annotations, val_annotations=None, flip=False),
                              main=True)
    assert data.dataset.keypoint_names[2] == "right_paw"


def test_validation_keypoints_must_be_the_training_ones(figures, tmp_path):
    def rename(data):
        data["categories"][0]["keypoints"][0] = "top"
    annotations = _rewrite(figures["val_annotations"], tmp_path / "val.json", rename)
    with pytest.raises(MaskRCNNError, match=rf"^{annotations}: keypoints differ from the training set's"):
        open_training_data(_config(figures, val_annotations=annotations), main=True)


def test_the_model_gets_a_keypoint_head_of_the_datasets_size_with_its_names_and_skeleton(figures, monkeypatch):
    """The ModelConfig fields (keypoints, keypoint_names, skeleton) are the model side's; here the options
    are caught on their way to it (and only those ModelConfig has are passed on)."""
    import dataclasses

    import maskrcnn.modeling.model as model_module

    asked = []
    real = model_module.arch_config
    known = {field.name for field in dataclasses.fields(model_module.ModelConfig)}

    def catching(arch, num_classes, **options):
        asked.append({key: options[key] for key in ("keypoints", "keypoint_names", "skeleton") if key in options})
        return real(arch, num_classes, **{key: value for key, value in options.items() if key in known})

    monkeypatch.setattr(model_module, "arch_config", catching)
    config = _config(figures, arch="resnet18_fpn", model={"fpn_channels": 32, "mask_head_channels": 32,
                                                          "box_head_hidden": 64})
    torch.manual_seed(0)
    build_training_model(config, 2, ["__background__", "figure"], [0, 1], keypoint_names=NAMES,
                         skeleton=[[1, 2], [1, 3]])
    assert asked == [{"keypoints": 5, "keypoint_names": tuple(NAMES), "skeleton": ((1, 2), (1, 3))}]
    build_training_model(config, 2, ["__background__", "figure"], [0, 1])
    assert asked[1] == {}  # no keypoints: no keypoint options, the ModelConfig defaults


def test_the_recipe_s_keypoint_head_and_its_loss_weight(figures, tmp_path):
    """From scratch the keypoint head is the recipe's (4 convs of 128 channels with BatchNorm, not
    torchvision's 8 of 512); `loss_weights` reaches the keypoint loss: weighted 0 (plain SGD, no weight
    decay) the keypoint predictor does not move while the box predictor does."""
    import maskrcnn
    from maskrcnn.engine.train import train

    small = {"fpn_channels": 32, "mask_head_channels": 32, "box_head_hidden": 64}
    recipe = build_training_model(_config(figures, arch="resnet18_fpn", model=small), 2, ["__background__", "figure"],
                                  [0, 1], keypoint_names=NAMES)[0]
    convs = recipe.keypoint_head.convs
    assert len(convs) == 4 and {conv.conv.out_channels for conv in convs} == {128}
    assert all(isinstance(conv.norm, torch.nn.BatchNorm2d) for conv in convs)

    def moved(weights, name):
        config = _config(figures, arch="resnet18_fpn", out=str(tmp_path / name), iters=2, optimizer="sgd", lr=0.01,
                         weight_decay=0.0, warmup_iters=0, bf16=False, loss_weights=weights, ema_decay=None,
                         eval_every=None, model={**small, "keypoint_head_channels": 16})
        model = build_training_model(config, 2, ["__background__", "figure"], [0, 1], keypoint_names=NAMES,
                                     skeleton=[[1, 2]])[0]
        init = {k: v.clone() for k, v in model.state_dict().items()}
        train(config, progress=False)
        final = maskrcnn.load(str(tmp_path / name / "model.safetensors")).state_dict()
        changed = {k for k in init if not torch.equal(init[k], final[k])}
        return (any(k.startswith("keypoint_predictor.") for k in changed),
                any(k.startswith("box_predictor.") for k in changed))

    assert moved({"loss_keypoint": 0.0}, "no_keypoint") == (False, True)
    assert moved({}, "all") == (True, True)
