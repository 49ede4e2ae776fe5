"""Which arithmetic inference runs in: `precision="auto"` resolved to one of modeling/plan.py's PRECISIONS
for the device at hand, once, where a model is loaded.

- "fp32": torchvision's arithmetic, bit for bit (the default of `maskrcnn.load`, the parity reference).
- "fp32-fast": fp32 numbers with the fast paths of the bf16 plan (BN folded into the convolutions,
  channels-last, the sparse RoIAlign, only the detected class's mask): off bit-level parity by rounding.
- "bf16" / "fp16": half-width convolutions and matmuls under autocast.

"auto" (the default of `predict`, `serve` and `demo`): on a CPU with native bf16 (AVX512-BF16 or AMX)
"bf16"; on other CPUs "fp32-fast"; on a GPU "bf16" where it has bf16, else "fp32". Speed paths are judged
by their agreement with fp32 on trained models (benchmarks/README.md), not by parity with a random one.
"""

from __future__ import annotations

import torch

AUTO = "auto"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: where bf16 matmuls and convolutions run at about twice the fp32 rate."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """`precision` itself, or for "auto" the fastest precision with agreement on `device` (see above)."""
    if precision != AUTO:
        return precision
    device = torch.device(device)
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32-fast"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "fp32"


__all__ = ["AUTO", "cpu_has_native_bf16", "resolve_precision"]
