"""The optimizer and its learning-rate schedule: linear warm-up, then step, cosine or constant (with a linear
cool-down) decay; weight decay only where it helps."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_factor(iteration: int, total_iters: int, config: TrainConfig) -> float:
    """Multiplier of the base lr at `iteration` (0-based): linear warm-up times step or cosine decay."""
    factor = 1.0
    if iteration < config.warmup_iters:
        alpha = iteration / config.warmup_iters
        factor = config.warmup_factor * (1 - alpha) + alpha
    if config.schedule == "step":
        milestones = [round(s * total_iters) if s < 1 else int(s) for s in config.steps]
        factor *= config.gamma ** sum(iteration >= m for m in milestones)
    elif config.schedule == "cosine":
        progress = min(iteration / max(total_iters, 1), 1.0)
        factor *= config.min_lr_factor + (1 - config.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    elif config.schedule == "constant" and config.cooldown > 0:
        remaining = (total_iters - iteration) / (config.cooldown * total_iters)
        factor *= min(1.0, max(remaining, 0.0))
    return factor


def param_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    """Weight decay on conv/linear weights only: decaying norm scales and biases just fights the norm."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if config.no_decay_norm_and_bias and param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device,
                    total_iters: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer `config` names (resolved: sgd or adamw) and its per-iteration lr schedule."""
    # fused: one kernel over all parameters (3x faster than the per-tensor loop on CPU)
    fused = device.type in ("cpu", "cuda")
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(param_groups(model, config), lr=config.lr, fused=fused)
    else:
        optimizer = torch.optim.SGD(param_groups(model, config), lr=config.lr, momentum=config.momentum, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, total_iters, config))
    return optimizer, scheduler
