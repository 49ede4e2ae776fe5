"""Hand-checkable cases for each stage."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from maskrcnn.modeling.anchors import AnchorGenerator, base_anchors
from maskrcnn.modeling.backbone import ResNet
from maskrcnn.modeling.boxes import BoxCoder, clip_boxes
from maskrcnn.modeling.layers import FrozenBatchNorm2d
from maskrcnn.modeling.model import build_model
from maskrcnn.modeling.poolers import level_of_boxes
from maskrcnn.modeling.postprocess import paste_masks
from maskrcnn.modeling.transform import ImageTransform


def test_base_anchors_by_hand():
    # square: side 32 centred at 0; ratio 0.5 (h/w): w = 32/sqrt(.5) = 45.25 -> half 22.6 -> 23, h half 11.3 -> 11
    a = base_anchors(32, (0.5, 1.0, 2.0))
    assert a.tolist() == [[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]]


def test_anchor_grid_order_and_stride():
    gen = AnchorGenerator(sizes=(32, 64), aspect_ratios=(1.0,))
    level0, level1 = gen((64, 96), [(16, 24), (8, 12)], torch.device("cpu"))
    assert level0.shape == (16 * 24, 4) and level1.shape == (8 * 12, 4)
    # cell (row 0, col 1) is the 2nd anchor: shifted by the stride 4 in x
    assert level0[1].tolist() == [4 - 16, -16, 4 + 16, 16]
    # cell (row 1, col 0) comes after a full row
    assert level0[24].tolist() == [-16, 4 - 16, 16, 4 + 16]
    assert level1[13].tolist() == [8 - 32, 8 - 32, 8 + 32, 8 + 32]


def test_box_encode_decode_round_trip():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(50, 2, generator=g) * 100
    ref = torch.cat((ref, ref + 1 + torch.rand(50, 2, generator=g) * 50), 1)
    boxes = torch.rand(50, 2, generator=g) * 100
    boxes = torch.cat((boxes, boxes + 1 + torch.rand(50, 2, generator=g) * 50), 1)
    deltas = coder.encode(boxes, ref)
    assert torch.allclose(coder.decode(deltas, ref)[:, 0], boxes, atol=1e-3)
    # zero deltas decode to the reference box itself
    assert torch.allclose(coder.decode(torch.zeros(50, 8), ref)[:, 1], ref, atol=1e-4)
    # a box twice as wide, same centre: dw = 5 * log 2
    d = coder.encode(torch.tensor([[0.0, 0, 40, 10]]), torch.tensor([[10.0, 0, 30, 10]]))
    assert torch.allclose(d, torch.tensor([[0.0, 0, 5 * math.log(2), 0]]))


def test_clip_boxes():
    b = torch.tensor([[-5.0, -1, 700, 50], [10, 20, 30, 500]])
    assert clip_boxes(b, (480, 640)).tolist() == [[0, 0, 640, 50], [10, 20, 30, 480]]


def test_level_mapping():
    def box(side):
        return torch.tensor([[0.0, 0.0, side, side]])
    # 224 -> P4 (index 2 counting from P2); halving the side moves one level down; clamped to P2..P5
    assert [level_of_boxes(box(s), 2, 5).item() for s in (224, 112, 111, 56, 10, 448, 2000)] == [2, 1, 0, 0, 0, 3, 3]


def test_frozen_batchnorm_matches_eval_batchnorm():
    bn = torch.nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2); bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1); bn.running_var.uniform_(0.5, 2)
    frozen = FrozenBatchNorm2d(8)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    x = torch.randn(2, 8, 5, 5)
    assert torch.allclose(frozen(x), bn(x), atol=1e-5)


def test_resnet_feature_strides_and_channels():
    for depth, channels in ((18, [64, 128, 256, 512]), (50, [256, 512, 1024, 2048])):
        net = ResNet(depth).eval()
        feats = net(torch.rand(1, 3, 64, 96), "separate")
        assert [f.shape[1] for f in feats] == channels == net.out_channels
        assert [f.shape[-2:] for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_frozen_stages_have_no_gradients():
    net = ResNet(18, frozen_stages=2)
    assert not any(p.requires_grad for p in net.layer1.parameters())
    assert all(p.requires_grad for p in net.layer2.parameters() if p.dtype.is_floating_point)


def test_transform_resize_and_pad():
    t = ImageTransform(min_size=800, max_size=1333).eval()
    batch, sizes, _ = t([torch.rand(3, 480, 640), torch.rand(3, 500, 2000)])
    assert sizes[0] == (800, 1066)        # 800/480 = 1.667; 640 * 1.667 = 1066.7 floors to 1066
    assert sizes[1] == (333, 1333)        # long side capped: 2000 -> 1333
    assert batch.shape == (2, 3, 800, 1344) and batch.shape[-1] % 32 == 0
    assert batch[1, :, 333:].abs().sum() == 0  # padding is zero


def _paste_one_by_one(mask: torch.Tensor, box: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Reference: pad by one pixel, grow the box to match, resize with F.interpolate, copy into place."""
    m = F.pad(mask[None, None], (1, 1, 1, 1))[0, 0]
    scale = (mask.shape[-1] + 2) / mask.shape[-1]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) / 2 * scale, (box[3] - box[1]) / 2 * scale
    x0, y0, x1, y1 = [int(v) for v in (cx - hw, cy - hh, cx + hw, cy + hh)]
    bw, bh = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
    r = F.interpolate(m[None, None], size=(bh, bw), mode="bilinear", align_corners=False)[0, 0]
    out = torch.zeros(h, w)
    ys, ye, xs, xe = max(y0, 0), min(y1 + 1, h), max(x0, 0), min(x1 + 1, w)
    if ye > ys and xe > xs:
        out[ys:ye, xs:xe] = r[ys - y0:ye - y0, xs - x0:xe - x0]
    return out


def test_paste_known_mask():
    # a full 28x28 mask in box (10,20)-(38,48): inside is 1, outside 0, edges fade over about a pixel
    masks = torch.ones(1, 28, 28)
    pasted = paste_masks(masks, torch.tensor([[10.0, 20.0, 38.0, 48.0]]), (60, 50))[0]
    assert pasted[22:46, 12:36].min() > 0.99
    assert pasted[:18].abs().max() == 0 and pasted[:, :8].abs().max() == 0 and pasted[51:].abs().max() == 0


def test_paste_matches_per_mask_interpolation():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(12, 28, 28, generator=g)
    xy = torch.rand(12, 2, generator=g) * 120 - 20
    boxes = torch.cat((xy, xy + torch.rand(12, 2, generator=g) * 80 + 0.2), 1)
    boxes[0] = torch.tensor([5.0, 5.0, 5.3, 5.2])  # sub-pixel box
    pasted = paste_masks(masks, boxes, (90, 110))
    for m, b, p in zip(masks, boxes, pasted):
        assert torch.allclose(p, _paste_one_by_one(m, b, 90, 110), atol=1e-5)


def test_exact_paste_is_grid_sample_over_the_half_pixel_shifted_box():
    """mode="exact": canvas pixel p (centre p + 0.5) reads the mask bilinearly at its place in the box moved
    by (+0.5, +0.5), zero outside: F.grid_sample with align_corners=False and zero padding, built here from
    the box coordinates alone; also the numpy copy used for exported models."""
    from maskrcnn.export.runtime import paste_masks as paste_masks_numpy

    g = torch.Generator().manual_seed(2)
    masks = torch.rand(9, 28, 28, generator=g)
    xy = torch.rand(9, 2, generator=g) * 100 - 15
    boxes = torch.cat((xy, xy + torch.rand(9, 2, generator=g) * 70 + 0.3), 1)
    height, width = 70, 90
    pasted = paste_masks(masks, boxes, (height, width), mode="exact")
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    for mask, box, out in zip(masks, boxes, pasted):
        x0, y0, x1, y1 = (box + 0.5).tolist()
        gx = (xs - x0) / (x1 - x0) * 2 - 1
        gy = (ys - y0) / (y1 - y0) * 2 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None]
        expected = F.grid_sample(mask[None, None], grid, mode="bilinear", padding_mode="zeros",
                                 align_corners=False)[0, 0]
        assert torch.allclose(out, expected, atol=2e-4)  # float32 rounding of the thinnest boxes' scales
    in_numpy = paste_masks_numpy(masks.numpy(), boxes.numpy(), (height, width), mode="exact")
    assert np.allclose(in_numpy, pasted.numpy(), atol=2e-4)
    with pytest.raises(ValueError, match="paste mode"):
        paste_masks(masks, boxes, (height, width), mode="nearest")
    with pytest.raises(ValueError, match="paste mode"):
        paste_masks_numpy(masks.numpy(), boxes.numpy(), (height, width), mode="nearest")


def test_exact_paste_puts_a_mask_target_back_where_it_was_cut():
    """A disc's 28x28 training target, cut by torchvision's roi_align (aligned=False, as Mask R-CNN's mask
    targets are), pasted back into its box: in "exact" mode it lands on the disc (centroid within 0.05 px,
    IoU > 0.99); torchvision's whole-pixel paste is off by about half a pixel and one pixel too wide."""
    from torchvision.ops import roi_align

    size = 64
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    disc = (((xx - 30.3) ** 2 + (yy - 27.6) ** 2) <= 9.0 ** 2).float()
    box = torch.tensor([[19.8, 17.1, 40.8, 38.1]])  # the disc's bounding box with 1.5 px to spare
    target = roi_align(disc[None, None], [box], (28, 28), 1.0, 2, aligned=False)[:, 0]
    centre_y, centre_x = (torch.nonzero(disc > 0).float() + 0.5).mean(0)
    results = {}
    for mode in ("exact", "torchvision"):
        back = paste_masks(target, box, (size, size), mode=mode)[0] >= 0.5
        ys, xs = torch.nonzero(back, as_tuple=True)
        shift = ((xs.float() + 0.5).mean() - centre_x, (ys.float() + 0.5).mean() - centre_y)
        iou = (back & (disc > 0)).sum() / (back | (disc > 0)).sum()
        results[mode] = (max(abs(float(shift[0])), abs(float(shift[1]))), float(iou))
    assert results["exact"][0] < 0.05 and results["exact"][1] > 0.99, results
    assert results["torchvision"][0] > 0.2 and results["torchvision"][1] < 0.95, results


def test_model_accepts_any_sizes_and_returns_input_pixels():
    model = build_model("resnet18_fpn", num_classes=5, min_size=128, max_size=256).eval()
    images = [torch.rand(3, 100, 150), torch.rand(3, 77, 60)]
    out = model(images)
    for o, im in zip(out, images):
        assert o["masks"].shape[-2:] == im.shape[-2:]
        assert o["masks"].dtype == torch.float32 and o["labels"].dtype == torch.int64
        if len(o["boxes"]):
            assert o["boxes"][:, 2].max() <= im.shape[-1] and o["boxes"][:, 3].max() <= im.shape[-2]
            assert 1 <= o["labels"].min() and o["labels"].max() <= 4


@pytest.mark.parametrize("ratio", [2, 3, 4])
def test_training_roi_align_matches_torchvision(ratio):
    from torchvision.ops import roi_align as reference

    from maskrcnn.modeling.poolers import roi_align

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 8, 20, 24, generator=g)
    xy = torch.rand(40, 2, generator=g) * 100 - 10  # some boxes poke out of the map
    boxes = torch.cat((xy, xy + torch.rand(40, 2, generator=g) * 60 + 0.5), 1)
    boxes[0] = torch.tensor([3.0, 3.0, 3.2, 3.1])  # smaller than one cell: clamped to size 1
    rois = torch.cat((torch.randint(0, 2, (40, 1), generator=g).float(), boxes), 1)
    grads = []
    # ours on NCHW and on channels-last maps (training runs channels-last on CPU)
    sparse = functools.partial(roi_align, kernel="sparse")
    for fn, layout in ((reference, torch.contiguous_format), (sparse, torch.contiguous_format),
                       (sparse, torch.channels_last)):
        x = feats.clone().contiguous(memory_format=layout).requires_grad_(True)
        out = fn(x, rois, 7, 0.25, ratio)
        out.backward(torch.arange(out.numel(), dtype=torch.float32).reshape(out.shape) % 7 - 3)
        grads.append((out.detach(), x.grad))
    assert grads[0][0].abs().max() > 0 and grads[0][1].abs().max() > 0
    for out, grad in grads[1:]:
        assert torch.allclose(grads[0][0], out, atol=1e-5)
        assert torch.allclose(grads[0][1], grad, atol=1e-5)


def test_pooling_map_has_one_entry_per_touched_cell():
    """The sparse map sums the bilinear weights of a bin's sample points per feature cell: no row holds a
    column twice or a zero weight, and a bin 3.5 cells wide touches at most 5x5 cells, not 4x4 points x 4."""
    from maskrcnn.modeling.poolers import _pooling_map

    rois = torch.tensor([[0.0, 8.0, 12.0, 106.0, 110.0], [1.0, -30.0, 50.0, 20.0, 99.0], [0.0, 3.0, 3.0, 3.2, 3.1]])
    pooling = _pooling_map(rois, torch.Size((2, 8, 40, 40)), 7, 0.25, 4)
    rows, cols, values = pooling.crow_indices(), pooling.col_indices(), pooling.values()
    assert (values != 0).all()
    per_row = rows.diff()
    for r in range(len(per_row)):
        row_cols = cols[rows[r]:rows[r + 1]]
        assert len(row_cols.unique()) == len(row_cols)
    assert per_row[:49].max() <= 25 and per_row[:49].min() >= 16  # first box: 98 px / 4 / 7 = 3.5 cells per bin
    # every row's weights sum to the share of its sample points that fall on the map
    dense = pooling.to_dense()
    assert torch.allclose(dense[:49].sum(1), torch.ones(49))
    assert dense[49:98].sum(1).min() < 1e-6  # the second box's left columns lie more than a cell off the map


def test_folded_norms_give_the_same_features():
    torch.manual_seed(0)
    net = ResNet(50, norm="frozen_bn").eval()
    for m in net.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        plain = net(x, "separate")
        folded = net(x, "cached")
        net.layer1[0].bn1.running_var.mul_(2)  # changed statistics must rebuild the folded weights
        refolded = net(x, "cached")
        changed = net(x, "separate")
    for a, b in zip(plain, folded):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    assert not torch.allclose(folded[0], refolded[0])
    assert torch.allclose(changed[0], refolded[0], rtol=1e-4, atol=1e-4 * changed[0].abs().max().item())


def test_frozen_norm_folded_in_training_gives_the_same_outputs_and_gradients():
    """With gradients on, conv + frozen BN runs as one conv with scaled weights; autograd must still
    deliver the unfolded computation's gradients to the conv weight and the input."""
    from maskrcnn.modeling.layers import conv_norm

    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    norm = FrozenBatchNorm2d(6)
    norm.running_mean.uniform_(-0.5, 0.5)
    norm.running_var.uniform_(0.5, 2.0)
    norm.weight.uniform_(0.5, 1.5)
    norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 9, 11)
    results = []
    for fn in (lambda inp: norm(conv(inp)), lambda inp: conv_norm(conv, norm, inp, "autograd")):
        conv.weight.grad = None
        inp = x.clone().requires_grad_(True)
        out = fn(inp)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), inp.grad, conv.weight.grad.clone()))
    (plain, plain_dx, plain_dw), (folded, folded_dx, folded_dw) = results
    assert plain_dw.abs().max() > 0
    assert torch.allclose(plain, folded, atol=1e-5)
    assert torch.allclose(plain_dx, folded_dx, atol=1e-5)
    assert torch.allclose(plain_dw, folded_dw, atol=1e-5)


def test_training_roi_align_under_bf16_autocast_keeps_dtypes():
    from torchvision.ops import roi_align as reference

    from maskrcnn.modeling.poolers import roi_align

    g = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 16, 32, 32, generator=g).to(torch.bfloat16).requires_grad_(True)
    rois = torch.tensor([[0.0, 4.0, 4.0, 60.0, 90.0], [0.0, 30.0, 10.0, 31.0, 100.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align(feats, rois, 14, 0.25, 2, "sparse")
    expected = reference(feats.detach().float(), rois, 14, 0.25, 2)
    assert out.dtype == torch.bfloat16 and out.shape == expected.shape
    assert torch.allclose(out.float(), expected, atol=0.05, rtol=0.02)
    out.float().sum().backward()
    assert feats.grad.dtype == torch.bfloat16 and feats.grad.float().abs().sum() > 0


def test_mask_predictor_training_path_equals_the_all_class_convolutions():
    """In training the upsampling runs as 1x1 conv + pixel shuffle and only each RoI's class is scored;
    both must be the same function as the transposed conv + all-class logits used at inference."""
    from maskrcnn.modeling.mask_head import MaskPredictor

    torch.manual_seed(0)
    predictor = MaskPredictor(16, 5, 8)
    nn.init.normal_(predictor.upsample.bias)
    nn.init.normal_(predictor.logits.bias)
    x = torch.randn(6, 16, 14, 14)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    with torch.no_grad():
        every_class = predictor(x, "transposed")
    assert every_class.shape == (6, 5, 28, 28)
    selected = predictor(x.requires_grad_(True), "pixel_shuffle", labels=labels)
    assert selected.shape == (6, 28, 28)
    assert torch.allclose(selected, every_class[torch.arange(6), labels], atol=1e-5)
    selected.sum().backward()
    assert predictor.upsample.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    assert predictor.logits.weight.grad[:, :, 0, 0].abs().sum(1).gt(0).tolist() == [True] * 5


def test_bf16_inference_returns_fp32_detections_in_the_image():
    """The bf16 path runs channels-last under autocast and pools from fp32 copies of the features; what it
    returns must look exactly like the fp32 path's output (dtypes, shapes, ranges), and switching back to
    fp32 must give the fp32 results again (no state left behind)."""
    from conftest import tiny_model

    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 120, 150, generator=g), torch.rand(3, 90, 70, generator=g)]
    with torch.no_grad():
        before = model(images)
        model.precision = "bf16"
        reduced = model(images)
        model.precision = "fp32"
        after = model(images)
    for fp32, bf16, image in zip(before, reduced, images):
        assert len(bf16["boxes"]) > 0
        assert bf16["boxes"].dtype == bf16["scores"].dtype == bf16["masks"].dtype == torch.float32
        assert bf16["masks"].shape[1:] == (1, *image.shape[-2:])
        assert 0 <= bf16["masks"].min() and bf16["masks"].max() <= 1
        assert bf16["boxes"][:, 2].max() <= image.shape[-1] and bf16["boxes"][:, 3].max() <= image.shape[-2]
    for a, b in zip(before, after):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"])


def test_mask_predictor_detected_class_logits_on_channels_last_input():
    """The bf16 path feeds the mask head channels-last; the detected-class logits must equal the
    all-classes logits picked at each RoI's label, whatever the layout."""
    from maskrcnn.modeling.mask_head import MaskPredictor

    torch.manual_seed(0)
    predictor = MaskPredictor(16, 5, 8).eval()
    x = torch.randn(6, 16, 14, 14)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    with torch.no_grad():
        every = predictor(x, "transposed")[torch.arange(6), labels]
        plain = predictor(x, "transposed", labels=labels)
        channels_last = predictor(x.contiguous(memory_format=torch.channels_last), "transposed", labels=labels)
    assert torch.allclose(every, plain, atol=1e-5)
    assert torch.allclose(every, channels_last, atol=1e-5)


def test_mask_predictor_training_path_takes_zero_rois():
    """An image (or a process's share of a batch) with no positive proposal sends 0 RoIs through training."""
    from maskrcnn.modeling.mask_head import MaskPredictor

    predictor = MaskPredictor(16, 5, 8)
    x = torch.zeros(0, 16, 14, 14, requires_grad=True)
    out = predictor(x, "pixel_shuffle", labels=torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, 28, 28)
    (out.sum() * 0).backward()
    assert predictor.upsample.weight.grad is not None and predictor.logits.weight.grad is not None


def test_sampling_ratios_reach_the_poolers():
    """box_sampling_ratio / mask_sampling_ratio: the RoIs of each head are pooled with that many sample
    points per bin side, in eval (torchvision's kernel) and in training (the sparse one) alike."""
    from torchvision.ops import roi_align as reference

    from maskrcnn.modeling.model import build_model

    model = build_model("resnet18_fpn", 3, box_sampling_ratio=4, mask_sampling_ratio=3, fpn_channels=8,
                        mask_head_channels=8)
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(1, 8, 64 // 2 ** i, 64 // 2 ** i, generator=g) for i in range(4)]
    boxes = [torch.tensor([[2.0, 3.0, 50.0, 41.0], [10.0, 10.0, 30.5, 60.0]])]  # both pooled from P2
    rois = torch.cat((torch.zeros(2, 1), boxes[0]), 1)
    for pooler, size, ratio in ((model.box_pooler, 7, 4), (model.mask_pooler, 14, 3)):
        expected = reference(features[0], rois, size, 0.25, ratio)
        assert not torch.allclose(expected, reference(features[0], rois, size, 0.25, 2), atol=1e-3)
        assert torch.allclose(pooler(features, boxes, [(256, 256)], "torchvision"), expected, atol=1e-6)
        trainable = [f.clone().requires_grad_(True) for f in features]
        assert torch.allclose(pooler(trainable, boxes, [(256, 256)], "sparse"), expected, atol=1e-5)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="box_sampling_ratio"):
            build_model("resnet18_fpn", 3, box_sampling_ratio=bad)
    with pytest.raises(ValueError, match="rpn.pre_nms_top_n_train must be a positive integer, got 0"):
        build_model("resnet18_fpn", 3, rpn={"pre_nms_top_n_train": 0})


def test_mlp_box_head_norm_is_batchnorm_after_each_layer():
    """The normed head computes relu(bn2(fc2(relu(bn1(fc1(x)))))): by hand with F.batch_norm, in training
    (batch statistics) and in eval mode (running statistics)."""
    from maskrcnn.modeling.box_head import MLPBoxHead

    torch.manual_seed(0)
    head = MLPBoxHead(8, pooled_size=3, hidden=16, norm="bn")
    x = torch.randn(20, 8, 3, 3)
    for training in (True, False):
        head.train(training)
        n1, n2 = head.norm1, head.norm2
        stats = [(n.running_mean.clone(), n.running_var.clone()) for n in (n1, n2)]
        h = F.batch_norm(head.fc1(x.flatten(1)), *stats[0], n1.weight, n1.bias, training, 0.1, n1.eps)
        h = F.batch_norm(head.fc2(h.relu()), *stats[1], n2.weight, n2.bias, training, 0.1, n2.eps)
        class_features, box_features = head(x, "separate")
        assert class_features is box_features  # a shared head: one tensor for both predictions
        assert torch.allclose(class_features, h.relu(), atol=1e-6)
    with pytest.raises(ValueError, match="mlp box head"):
        MLPBoxHead(8, 3, 16, norm="frozen_bn")


def test_split_box_head_gives_each_task_its_own_layers():
    """split_mlp: the class logits are a function of the classification layers alone and the box deltas of
    the regression layers alone; each equals the predictor applied to its own 2-fc head's output."""
    from maskrcnn.modeling.model import build_model

    torch.manual_seed(0)
    model = build_model("resnet18_fpn", 5, box_head="split_mlp", mlp_head_norm="bn", fpn_channels=16,
                        mask_head_channels=16).eval()
    head, predictor = model.box_head, model.box_predictor
    x = torch.randn(6, 16, 7, 7)
    logits, deltas = predictor(head(x, "separate"))
    assert logits.shape == (6, 5) and deltas.shape == (6, 20)
    assert torch.allclose(logits, predictor.class_logits(head.classification(x, "separate")[0]), atol=1e-6)
    assert torch.allclose(deltas, predictor.box_deltas(head.regression(x, "separate")[1]), atol=1e-6)
    with torch.no_grad():
        head.regression.fc1.weight.mul_(3.0)
    logits2, deltas2 = predictor(head(x, "separate"))
    assert torch.equal(logits, logits2) and not torch.allclose(deltas, deltas2)
    # a train-mode pass reaches both branches' weights
    model.train()
    logits, deltas = predictor(head(x, "autograd"))
    (logits.sum() + deltas.sum()).backward()
    assert head.classification.fc1.weight.grad.abs().sum() > 0
    assert head.regression.fc1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="split_mlp"):
        build_model("resnet18_fpn", 5, box_head="fc")
