"""Anchor boxes: one size per FPN level, three aspect ratios, centred on every feature-map cell."""

from __future__ import annotations

import torch
from torch import nn


def base_anchors(size: float, aspect_ratios: tuple[float, ...]) -> torch.Tensor:
    """(A, 4) anchors centred at the origin with area size**2 and height/width = ratio, rounded to pixels."""
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratio = torch.sqrt(ratios)
    w = (1 / h_ratio) * size
    h = h_ratio * size
    return (torch.stack((-w, -h, w, h), dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (32, 64, 128, 256, 512),
                 aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)):
        super().__init__()
        self.sizes = tuple(sizes)
        self.aspect_ratios = tuple(aspect_ratios)
        self._cache: dict = {}

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.aspect_ratios)

    def forward(self, batch_shape: tuple[int, int], feature_shapes: list[tuple[int, int]],
                device: torch.device, cache: bool = True) -> list[torch.Tensor]:
        """Anchors per level, each (H*W*A, 4) ordered by row, column, then ratio — the order in which
        the RPN head's outputs are flattened. Identical for every image of a batch. cache=False (tracing):
        computed from the shapes every time, as a cached grid would be a constant in the trace."""
        if not cache:
            return self._grids(batch_shape, feature_shapes, device)
        key = (tuple(batch_shape), tuple(map(tuple, feature_shapes)), str(device))
        if key not in self._cache:
            if len(self._cache) > 32:
                self._cache.clear()
            self._cache[key] = self._grids(batch_shape, feature_shapes, device)
        return self._cache[key]

    def _grids(self, batch_shape, feature_shapes, device) -> list[torch.Tensor]:
        return [self._grid(batch_shape, shape, size, device) for shape, size in zip(feature_shapes, self.sizes)]

    def _grid(self, batch_shape, feature_shape, size, device) -> torch.Tensor:
        fh, fw = feature_shape
        # The stride is how many input pixels one feature cell spans (integer division, as pixels are).
        stride_y, stride_x = batch_shape[0] // fh, batch_shape[1] // fw
        ys = torch.arange(fh, dtype=torch.int64, device=device) * stride_y
        xs = torch.arange(fw, dtype=torch.int64, device=device) * stride_x
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        x, y = x.reshape(-1), y.reshape(-1)
        shifts = torch.stack((x, y, x, y), dim=1)
        anchors = base_anchors(size, self.aspect_ratios).to(device)
        return (shifts[:, None, :] + anchors[None, :, :]).reshape(-1, 4)
