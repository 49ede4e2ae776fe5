"""The one reading of a device setting (`--device`, `device=`): auto, cpu, cuda or cuda:N."""

from __future__ import annotations

import re

import torch

from .errors import MaskRCNNError

CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> CUDA when present, else the CPU; 'cpu', 'cuda', 'cuda:N' (or such a torch.device) -> that
    device once it is known to exist. Anything else is a MaskRCNNError of one line."""
    text = str(device).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise MaskRCNNError(f"device {str(device)!r} is not one this tool runs on; choose {CHOICES}")
    if not torch.cuda.is_available():
        raise MaskRCNNError(f"device {str(device)!r}: CUDA is not available on this machine (use cpu)")
    if match.group(1) is not None:
        index, count = int(match.group(1)), torch.cuda.device_count()
        if index >= count:
            raise MaskRCNNError(f"device {str(device)!r}: there is no such GPU; this machine has {count} "
                                f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
        return torch.device("cuda", index)
    return torch.device("cuda")


__all__ = ["resolve_device"]
