"""Stage panels: the staged run reproduces the model's own predictions, and every panel is written."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import maskrcnn
from maskrcnn.data.images import to_float_tensor
from maskrcnn.engine.stage_panels import stage_outputs, write_stage_panels


def small_model():
    torch.manual_seed(0)
    model = maskrcnn.build_model("resnet18_fpn", num_classes=4, min_size=128, max_size=192).eval()
    with torch.no_grad():
        model.box_predictor.class_logits.weight.mul_(50)
    return model


def test_stages_reproduce_predict():
    model = small_model()
    image = (np.random.default_rng(0).random((100, 140, 3)) * 255).astype(np.uint8)
    tensor = to_float_tensor(image)
    expected = model([tensor])[0]
    stages = stage_outputs(model, tensor)
    assert len(expected["boxes"]) > 0
    assert np.array_equal(stages["labels"], expected["labels"].numpy())
    assert np.allclose(stages["boxes"], expected["boxes"].numpy())
    assert stages["masks"].shape == (len(expected["boxes"]), 100, 140)
    # every final box was refined from one of the proposals, and proposals are a subset of the candidates
    assert len(stages["refined_from"]) == len(stages["boxes"])
    assert len(stages["proposals"]) <= len(stages["candidates"])
    assert stages["mask_probs"].shape[1:] == (28, 28)


def test_panels_written(tmp_path):
    image = (np.random.default_rng(1).random((90, 120, 3)) * 255).astype(np.uint8)
    paths = write_stage_panels(small_model(), image, tmp_path)
    assert [p.name for p in paths] == ["1_anchors.png", "2_proposals_before_nms.png", "3_proposals_after_nms.png",
                                       "4_box_refinement.png", "5_detections.png", "6_mask_probabilities.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.size[0] > 100 and im.size[1] > 50
