"""The few torch.distributed helpers the trainer needs.

A run is distributed when launched by `torchrun` (RANK, WORLD_SIZE and LOCAL_RANK in the environment);
otherwise every helper here degrades to the single-process case, so the trainer has one code path.
Multi-node runs need nothing special: torchrun's --nnodes/--rdzv flags set the same variables.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..devices import resolve_device


@dataclass
class ProcessInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files, logs and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def setup(device: str) -> tuple[ProcessInfo, torch.device]:
    """Join the process group if torchrun started us; returns this process's place and its device.

    CUDA processes each take the GPU numbered by LOCAL_RANK and talk over NCCL; CPU processes use gloo.
    The timeout is generous because the other ranks wait at a barrier while rank 0 validates.
    """
    if not launched_by_torchrun():
        return ProcessInfo(), resolve_device(device)
    info = ProcessInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    target = resolve_device(device)
    if target.type == "cuda":
        target = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(target)
    global _created_group
    if not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        kwargs = {"device_id": target} if target.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2), **kwargs)
        _created_group = True
    return info, target


_created_group = False  # set when setup() started the process group (so cleanup() may end it)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def sum_across_processes(values: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) a small tensor; identity in a single process."""
    if not is_initialized():
        return values
    if dist.get_backend() == "nccl":
        out = values.cuda()
        dist.all_reduce(out)
        return out.to(values.device)
    out = values.cpu().clone()
    dist.all_reduce(out)
    return out.to(values.device)


def broadcast_object(value, src: int = 0):
    """Send a picklable Python value from `src` to every process (e.g. 'rank 0 hit an error')."""
    if not is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup(finished: bool = True) -> None:
    """End the process group if setup() started it; one the caller created is the caller's to end.

    After a normal finish all processes meet at a barrier first, so none closes its connections while a
    peer is still receiving; objects in reference cycles that still hold the group (a DDP model) are freed
    now rather than during interpreter shutdown, when gloo's threads can abort the process. After an
    error there is no barrier: the peers may be inside another collective, and torchrun stops them."""
    global _created_group
    if _created_group and is_initialized():
        gc.collect()
        if finished:
            dist.barrier()
        dist.destroy_process_group()
    _created_group = False
