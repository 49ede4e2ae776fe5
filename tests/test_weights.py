"""Checkpoint formats, conversion and the errors users see."""

from __future__ import annotations

import urllib.error

import pytest
import torch

import maskrcnn
from maskrcnn import weights
from maskrcnn.errors import MaskRCNNError


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return maskrcnn.build_model("resnet18_fpn", num_classes=4, min_size=160, max_size=224).eval()


def test_safetensors_round_trip_gives_same_outputs(small_model, tmp_path):
    small_model.class_names = ["__background__", "cat", "dog", "bird"]
    small_model.category_ids = [0, 17, 18, 16]
    path = tmp_path / "model.safetensors"
    maskrcnn.save_checkpoint(small_model, path)
    loaded = maskrcnn.load(path, score_thresh=small_model.config.score_thresh)
    assert loaded.class_names == small_model.class_names and loaded.category_ids == [0, 17, 18, 16]
    assert loaded.config.depth == 18 and loaded.config.min_size == 160
    image = torch.rand(3, 120, 140)
    a, b = small_model([image])[0], loaded([image])[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])


def test_load_can_choose_the_mask_paste(small_model, tmp_path):
    """The checkpoint's paste by default; load(..., mask_paste="exact") changes only the masks' edges."""
    torch.manual_seed(1)
    model = maskrcnn.build_model("resnet18_fpn", num_classes=4, min_size=160, max_size=224, box_head="split_mlp",
                                 mask_paste="exact").eval()
    with torch.no_grad():
        model.box_predictor.class_logits.weight.mul_(50)
    path = tmp_path / "split.safetensors"
    maskrcnn.save_checkpoint(model, path)
    assert maskrcnn.load(path).config.mask_paste == "exact"
    legacy = maskrcnn.load(path, mask_paste="torchvision", score_thresh=model.config.score_thresh)
    image = torch.rand(3, 120, 140)
    a, b = model([image])[0], legacy([image])[0]
    assert len(a["boxes"]) > 0 and torch.equal(a["boxes"], b["boxes"])
    assert not torch.equal(a["masks"], b["masks"])
    with pytest.raises(MaskRCNNError, match="split.safetensors.*mask paste|split.safetensors.*mask_paste"):
        maskrcnn.load(path, mask_paste="nearest")


def test_load_can_choose_the_number_of_proposals(small_model, tmp_path):
    """load(..., proposals=N) caps the RPN proposals that reach the box head at N per image."""
    path = tmp_path / "model.safetensors"
    maskrcnn.save_checkpoint(small_model, path)
    image = torch.rand(3, 120, 140)
    seen = {}
    for n in (None, 7):
        model = maskrcnn.load(path, proposals=n)
        model.box_pooler.register_forward_hook(lambda m, args, out: seen.__setitem__(n, len(args[1][0])))
        model([image])
    assert seen[7] == 7 and seen[None] > 7
    for bad in (0, -3, 2.5, True):
        with pytest.raises(MaskRCNNError, match=r"model.safetensors: rpn.post_nms_top_n_test must be a positive integer"):
            maskrcnn.load(path, proposals=bad)


def test_old_torchvision_key_names_convert():
    old = {"backbone.fpn.inner_blocks.2.weight": 1, "rpn.head.conv.weight": 2,
           "roi_heads.mask_head.mask_fcn1.weight": 3, "roi_heads.mask_head.mask_fcn4.bias": 4,
           "roi_heads.box_head.fc6.weight": 5, "roi_heads.box_head.5.weight": 6}
    assert weights.from_torchvision(old) == {
        "fpn.lateral.2.conv.weight": 1, "rpn.head.conv.0.conv.weight": 2, "mask_head.convs.0.conv.weight": 3,
        "mask_head.convs.3.conv.bias": 4, "box_head.fc1.weight": 5, "box_head.fc.weight": 6}


def test_coco_names_match_torchvision_metadata():
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    assert weights.COCO_CLASS_NAMES == MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]


def test_torchvision_resnet18_with_other_class_count(tmp_path):
    from torchvision.models import resnet18
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    torch.manual_seed(0)
    ref = MaskRCNN(_resnet_fpn_extractor(resnet18(), 3), num_classes=7, min_size=200, max_size=300).eval()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    ours = maskrcnn.load(tmp_path / "r18.pth")
    assert ours.config.depth == 18 and ours.num_classes == 7 and ours.class_names[6] == "class_6"


def test_trainable_batchnorm_backbone_is_evaluated_as_batchnorm(tmp_path):
    """torchvision builds a trainable-BatchNorm backbone when no pretrained one is given; its state dict
    (with num_batches_tracked) must load as BatchNorm, whose eval arithmetic we then reproduce exactly."""
    from torchvision.models import resnet18
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    torch.manual_seed(0)
    ref = MaskRCNN(_resnet_fpn_extractor(resnet18(), 3), num_classes=5, min_size=256, max_size=320)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ref.roi_heads.box_predictor.cls_score.weight.mul_(20)
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    ref.eval()
    torch.save(ref.state_dict(), tmp_path / "bn.pth")
    ours = maskrcnn.load(tmp_path / "bn.pth")
    assert ours.config.backbone_norm == "bn"
    ours.transform.min_size, ours.transform.max_size = (256,), 320
    image = torch.rand(3, 200, 250, generator=g)
    with torch.no_grad():
        a, b = ref([image])[0], ours([image])[0]
    assert len(a["boxes"]) > 0 and torch.equal(a["labels"], b["labels"])
    assert (a["boxes"] - b["boxes"]).abs().max() <= 0.01 and (a["scores"] - b["scores"]).abs().max() <= 1e-4


def test_missing_file():
    with pytest.raises(MaskRCNNError, match="not found"):
        maskrcnn.load("/nonexistent/model.pth")


def test_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(MaskRCNNError, match=r"notes\.pth.*not a PyTorch checkpoint"):
        maskrcnn.load(bad)


def test_pickled_code_is_refused(tmp_path):
    bad = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "hook": print}, bad)
    with pytest.raises(MaskRCNNError, match="loaded safely"):
        maskrcnn.load(bad)


def test_missing_keys_are_named(small_model, tmp_path):
    state = small_model.state_dict()
    del state["mask_predictor.logits.bias"]
    torch.save({"model": state, "config": small_model.config.to_dict()}, tmp_path / "ckpt.pt")
    with pytest.raises(MaskRCNNError, match=r"missing keys \(e\.g\. mask_predictor\.logits\.bias"):
        maskrcnn.load(tmp_path / "ckpt.pt")


def test_wrong_class_count_in_checkpoint(small_model, tmp_path):
    config = small_model.config.to_dict() | {"num_classes": 9}
    torch.save({"model": small_model.state_dict(), "config": config}, tmp_path / "ckpt.pt")
    with pytest.raises(MaskRCNNError, match="shape mismatches.*box_predictor"):
        maskrcnn.load(tmp_path / "ckpt.pt")


def test_inconsistent_heads(small_model, tmp_path):
    state = {k: v for k, v in small_model.state_dict().items()}
    state["mask_predictor.logits.weight"] = state["mask_predictor.logits.weight"][:2]
    torch.save(state, tmp_path / "plain.pth")
    with pytest.raises(MaskRCNNError, match="inconsistent class counts"):
        maskrcnn.load(tmp_path / "plain.pth")


def test_unknown_registry_name():
    with pytest.raises(MaskRCNNError, match="unknown weights name"):
        maskrcnn.load("torchvision:no_such_model")


def test_download_without_network_says_where_to_put_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "urlopen", offline)  # what torch.hub.download_url_to_file opens the url with
    with pytest.raises(MaskRCNNError) as info:
        maskrcnn.load("torchvision:maskrcnn_resnet50_fpn_coco")
    message = str(info.value)
    assert "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth" in message and str(tmp_path) in message
    assert not list(tmp_path.rglob("*.part*")), "partial download left behind"  # ours .part, torch.hub's .partial


def test_registered_file_in_cache_is_used(monkeypatch, tmp_path):
    from conftest import torchvision_reference

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path = weights.registry_path("torchvision:maskrcnn_resnet50_fpn_v2_coco")
    path.parent.mkdir(parents=True)
    torch.save(torchvision_reference("v2").state_dict(), path)
    model = maskrcnn.load("torchvision:maskrcnn_resnet50_fpn_v2_coco")
    assert model.config.box_head == "conv" and model.class_names[18] == "dog"


def test_keypoint_registry_entry_and_names_are_torchvisions(monkeypatch, tmp_path):
    from torchvision.models.detection import KeypointRCNN_ResNet50_FPN_Weights

    from conftest import torchvision_keypoint_reference
    from maskrcnn.modeling.keypoints import COCO_PERSON_KEYPOINT_NAMES

    published = KeypointRCNN_ResNet50_FPN_Weights.COCO_V1
    url, prefix = weights.REGISTRY["torchvision:keypointrcnn_resnet50_fpn_coco"]
    assert url == published.url and url.endswith(f"-{prefix}.pth")
    assert list(COCO_PERSON_KEYPOINT_NAMES) == published.meta["keypoint_names"]
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path = weights.registry_path("torchvision:keypointrcnn_resnet50_fpn_coco")
    path.parent.mkdir(parents=True)
    torch.save(torchvision_keypoint_reference().state_dict(), path)
    model = maskrcnn.load("torchvision:keypointrcnn_resnet50_fpn_coco")
    assert (model.config.keypoints, model.config.masks, model.class_names) == (17, False, ["__background__", "person"])
