"""RoIAlign over the FPN: each box is pooled from the one pyramid level that matches its size."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn
from torch.onnx.operators import shape_as_tensor
from torchvision.ops import roi_align as tv_roi_align


def level_of_boxes(boxes: torch.Tensor, min_level: int | torch.Tensor, max_level: int | torch.Tensor,
                   canonical_size: float = 224.0, canonical_level: int = 4) -> torch.Tensor:
    """FPN paper eq. 1: a 224x224 box goes to P4, each halving of its side one level down.
    Returns the index into [min_level, max_level] (0 = finest). The bounds may be float tensors (the
    exported graph reads them off the feature shapes)."""
    side = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    level = torch.floor(canonical_level + torch.log2(side / canonical_size)
                        + torch.tensor(1e-6, dtype=side.dtype))
    return (level.clamp(min=min_level, max=max_level) - min_level).to(torch.int64)


def _sample_weights(start: torch.Tensor, length: torch.Tensor, size: int, bins: int, ratio: int):
    """Along one axis: for each RoI and output bin, the feature indices and bilinear weights of its
    `ratio` sample points (2 neighbours each), with RoIAlign's border rules (samples more than one cell
    outside the map count as zero; samples near the last cell are clamped onto it)."""
    step = length / bins
    pos = (start[:, None, None] + torch.arange(bins, dtype=start.dtype, device=start.device)[None, :, None] * step[:, None, None]
           + (torch.arange(ratio, dtype=start.dtype, device=start.device)[None, None, :] + 0.5) * step[:, None, None] / ratio)
    valid = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().to(torch.int64)
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    high = torch.where(at_end, low, low + 1)
    frac = torch.where(at_end, torch.zeros_like(pos), pos - low)
    index = torch.stack((low, high), -1).reshape(len(start), bins, -1)
    weight = (torch.stack((1 - frac, frac), -1) * valid[..., None]).reshape(len(start), bins, -1)
    return index, weight


def _merge_cells(index: torch.Tensor, weight: torch.Tensor):
    """One entry per distinct feature cell of each bin instead of 2 per sample point: with 4 points per
    side a bin of a P2 box touches ~3-5 cells, not 8, and the matmuls' cost is the number of entries.
    Returns (R, bins, K) indices and summed weights; K is the widest bin's span, unused slots weigh 0."""
    first = index[..., :1]  # sample positions increase along a bin, so the first low neighbour is the smallest
    offset = index - first
    span = int(offset.max()) + 1 if offset.numel() else 1
    merged = weight.new_zeros(index.shape[:-1] + (span,)).scatter_add_(-1, offset, weight)
    return first + torch.arange(span, device=index.device), merged


def _pooling_map(rois: torch.Tensor, shape: torch.Size, output_size: int, scale: float,
                 ratio: int) -> torch.Tensor:
    """RoIAlign as a sparse (K*S*S, N*H*W) matrix: row = output bin, one weight per feature cell its
    sample points touch (bilinear weights summed over the ratio^2 points), built in row order without sorting."""
    n, _, h, w = shape
    size = output_size
    x1, y1, x2, y2 = (rois[:, 1:].to(torch.float32) * scale).unbind(1)
    yi, yw = _merge_cells(*_sample_weights(y1, (y2 - y1).clamp(min=1.0), h, size, ratio))
    xi, xw = _merge_cells(*_sample_weights(x1, (x2 - x1).clamp(min=1.0), w, size, ratio))
    image = rois[:, 0].to(torch.int64)
    cols = image[:, None, None, None, None] * (h * w) + yi[:, :, None, :, None] * w + xi[:, None, :, None, :]
    weights = yw[:, :, None, :, None] * xw[:, None, :, None, :] / (ratio * ratio)
    # unused slots (and cells off the map, which weigh 0 too) are left out; row-major order keeps rows sorted
    keep = weights != 0
    per_row = keep.reshape(len(rois) * size * size, -1).sum(1)
    rows = torch.cat((per_row.new_zeros(1), per_row.cumsum(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(rows, cols[keep], weights[keep], (len(rois) * size * size, n * h * w))


class _SparseRoIAlign(torch.autograd.Function):
    """RoIAlign for training on CPU, as one multithreaded sparse matmul each way.

    torchvision's CPU RoIAlign runs on one thread and its backward recomputes the bilinear weights for
    every channel (together ~30% of a training step here). RoIAlign is a fixed sparse linear map of the
    features, so we build that map once per call, apply it to the channels-last feature rows, and apply
    its transpose to the output gradient. Same sample points and weights as torchvision; only the float
    summation order differs (~1e-6)."""

    @staticmethod
    def forward(ctx, features, rois, output_size, scale, sampling_ratio):
        n, c, h, w = features.shape
        pooling = _pooling_map(rois, features.shape, output_size, scale, sampling_ratio)
        ctx.save_for_backward(pooling)
        ctx.shape, ctx.dtype = features.shape, features.dtype
        with torch.autocast(features.device.type, enabled=False):
            rows = pooling @ features.to(torch.float32).permute(0, 2, 3, 1).reshape(n * h * w, c)
        out = rows.reshape(len(rois), output_size, output_size, c).permute(0, 3, 1, 2)
        return out.to(features.dtype, memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, grad):
        (pooling,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        with torch.autocast(grad.device.type, enabled=False):
            rows = grad.to(torch.float32).permute(0, 2, 3, 1).reshape(-1, c)
            flat = pooling.t() @ rows
        grad_features = flat.reshape(n, h, w, c).permute(0, 3, 1, 2).to(ctx.dtype)
        return grad_features, None, None, None, None


def roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: int, scale: float,
              sampling_ratio: int, kernel: str) -> torch.Tensor:
    """RoIAlign (aligned=False, as in Mask R-CNN's published weights) over (K, 5) rois [image, x1, y1, x2, y2].
    kernel="torchvision": torchvision's kernel (bit-exact parity); "sparse" (plan.ROI_ALIGN_KERNELS): the
    sparse version above where it applies, on CPU with a fixed sampling ratio (multithreaded, and free of
    copies on channels-last maps), torchvision's elsewhere."""
    if kernel not in ("torchvision", "sparse"):
        raise ValueError(f"unknown RoIAlign kernel {kernel!r}; choose 'torchvision' or 'sparse'")
    if kernel == "sparse" and features.device.type == "cpu" and sampling_ratio > 0 and len(rois):
        return _SparseRoIAlign.apply(features, rois, output_size, scale, sampling_ratio)
    return tv_roi_align(features, rois, output_size, scale, sampling_ratio)


class MultiLevelRoIAlign(nn.Module):
    def __init__(self, output_size: int, sampling_ratio: int = 2):
        super().__init__()
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio

    def forward(self, features: list[torch.Tensor], boxes: list[torch.Tensor], image_sizes: list,
                kernel: str, traceable: bool = False) -> torch.Tensor:
        """features: P2..P5 (N, C, H, W); boxes: per image (K_i, 4) -> (sum K_i, C, S, S).
        kernel: "torchvision" or "sparse" (which may differ from torchvision's in float rounding; see roi_align).
        Only the image heights are read (`pool`); traceable: see `pool`."""
        rois = torch.cat([torch.cat((torch.full_like(b[:, :1], i), b), dim=1) for i, b in enumerate(boxes)])
        return self.pool(features, rois, max(size[0] for size in image_sizes), kernel, traceable)

    def pool(self, features: list[torch.Tensor], rois: torch.Tensor, height, kernel: str,
             traceable: bool = False) -> torch.Tensor:
        """(K, 5) rois [image, x1, y1, x2, y2] -> (K, C, S, S), each from the level its size picks.

        Each level's scale is the power of two nearest to its height over the resized images' `height`, read
        off the shapes rather than assumed from the strides so that tiny images, where padding makes the two
        differ, pool as in torchvision; the level range follows from those scales: 1/4..1/32 for most
        images, but a very flat one (resized height under ~75 px) gets other powers of two.

        Every level runs, also on no boxes, and the results are gathered back into the boxes' order, so that
        a trace has no branch (an index_put would be exported as a ScatterND whose reshape fails on an empty
        level). traceable=True (an exported graph): `height` is a 0-d float tensor and the scales are read
        off the shapes with tensor ops; as RoiAlign's scale is an attribute of the ONNX node, fixed at
        export, the boxes are scaled instead (by a power of two: exact, the same sample points)."""
        if traceable:
            sides = torch.stack([shape_as_tensor(f)[2] for f in features]).to(torch.float32)
            log_scales = torch.round(torch.log2(sides / height))
        else:
            log_scales = [round(math.log2(f.shape[-2] / height)) for f in features]
        levels = level_of_boxes(rois[:, 1:], -log_scales[0], -log_scales[-1])
        pooled, order = [], []
        for level, feature in enumerate(features):
            idx = torch.where(levels == level)[0]
            level_rois, scale = rois[idx], 2.0 ** log_scales[level]
            if traceable:  # the scale would be a constant of the ONNX node: scale the boxes (exact, a power of 2)
                level_rois, scale = torch.cat((level_rois[:, :1], level_rois[:, 1:] * scale), dim=1), 1.0
            pooled.append(roi_align(feature, level_rois, self.output_size, scale, self.sampling_ratio, kernel))
            order.append(idx)
        # torch.cat(order) lists the boxes level by level; its argsort puts each result back at its box.
        return torch.cat(pooled)[torch.argsort(torch.cat(order))]
