"""The computation plan: the arithmetic each stage uses is the argument it is given, not the grad mode or
any other global state."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import roi_align as reference

from maskrcnn.modeling.layers import FrozenBatchNorm2d, conv_norm
from maskrcnn.modeling.mask_head import MaskPredictor
from maskrcnn.modeling.plan import FAST_INFERENCE, TORCHVISION, Plan, inference_plan, training_plan
from maskrcnn.modeling.poolers import roi_align


def test_precision_picks_the_plan():
    assert inference_plan("fp32") == Plan("separate", "torchvision", "all", "transposed", False, False)
    assert inference_plan("bf16") == inference_plan("fp16") == inference_plan("fp32-fast") == FAST_INFERENCE
    assert FAST_INFERENCE.norms == "cached" and FAST_INFERENCE.roi_align == "sparse"
    assert FAST_INFERENCE.mask_classes == "detected" and FAST_INFERENCE.mask_upsampling == "transposed"
    assert training_plan("cpu").channels_last and not training_plan("cuda").channels_last
    assert training_plan("cpu").norms == "autograd" and training_plan("cpu").mask_upsampling == "pixel_shuffle"
    with pytest.raises(ValueError, match="precision must be one of"):
        inference_plan("fp64")
    with pytest.raises(ValueError, match="plan roi_align must be one of"):
        Plan(roi_align="exact")


def test_auto_precision_follows_the_device(monkeypatch):
    """"auto": bf16 where the CPU has native bf16, fp32 with the fast plan on other CPUs; any other value is
    kept as given. cpu_has_native_bf16 is replaced, so both branches run on any machine."""
    import maskrcnn.precision as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("auto", torch.device("cpu")) == "fp32-fast"
    assert precision.resolve_precision("fp32", "cpu") == "fp32"
    assert precision.resolve_precision("bf16", "cpu") == "bf16"


def test_fp32_fast_runs_in_fp32_with_the_fast_plan(val_images):
    """fp32-fast: no autocast (every output fp32) and the fast plan: its detections are those of exact fp32
    up to rounding on this random tiny model (boxes within 0.5 px for the matched top detections)."""
    import numpy as np

    from conftest import read_rgb, tiny_model

    model = tiny_model()
    image = read_rgb(val_images[0])
    with torch.no_grad():
        exact = model.predict([image], settings=model.inference_settings(precision="fp32"))[0]
        fast = model.predict([image], settings=model.inference_settings(precision="fp32-fast"))[0]
    assert fast["boxes"].dtype == fast["scores"].dtype == fast["masks"].dtype == torch.float32
    assert len(exact["boxes"]) > 10
    n = min(10, len(fast["boxes"]))
    np.testing.assert_allclose(fast["boxes"][:n].numpy(), exact["boxes"][:n].numpy(), atol=0.5)
    assert not torch.equal(fast["masks"], exact["masks"]) or not torch.equal(fast["boxes"], exact["boxes"])


def test_torchvision_plan_is_bit_exact_with_gradients_on():
    """With gradients on (which used to switch every stage to its training path), the torchvision choices
    still compute torchvision's arithmetic bit for bit, and the training choices still take gradients."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 8, 20, 24, generator=g).requires_grad_(True)
    rois = torch.tensor([[0.0, 4.0, 6.0, 60.0, 70.0], [0.0, 1.5, 2.0, 30.0, 90.0]])
    expected = reference(feats.detach(), rois, 7, 0.25, 2)
    exact = roi_align(feats, rois, 7, 0.25, 2, "torchvision")
    assert torch.equal(exact, expected) and "Sparse" not in type(exact.grad_fn).__name__
    sparse = roi_align(feats, rois, 7, 0.25, 2, "sparse")
    assert "SparseRoIAlign" in type(sparse.grad_fn).__name__ and torch.allclose(sparse, expected, atol=1e-5)
    with pytest.raises(ValueError, match="unknown RoIAlign kernel 'exact'"):
        roi_align(feats, rois, 7, 0.25, 2, "exact")

    torch.manual_seed(0)
    conv, norm = nn.Conv2d(4, 6, 3, padding=1, bias=False), FrozenBatchNorm2d(6)
    norm.running_var.uniform_(0.5, 2.0)
    norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 9, 11, requires_grad=True)
    assert torch.equal(conv_norm(conv, norm, x, "separate"), norm(conv(x)))
    with pytest.raises(ValueError, match="unknown norm folding 'on'"):
        conv_norm(conv, norm, x, "on")

    predictor = MaskPredictor(8, 3, 4)
    nn.init.normal_(predictor.upsample.bias)
    pooled = torch.randn(5, 8, 14, 14, requires_grad=True)
    upsampled = torch.relu(predictor.upsample(pooled))
    assert torch.equal(predictor(pooled, "transposed"), predictor.logits(upsampled))
    shuffled = predictor(pooled, "pixel_shuffle")
    assert torch.allclose(shuffled, predictor.logits(upsampled), atol=1e-5)
    shuffled.sum().backward()
    assert pooled.grad.abs().sum() > 0
