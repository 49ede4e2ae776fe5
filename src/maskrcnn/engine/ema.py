"""An exponential moving average (EMA) of a model's weights, the model that is evaluated and saved.

At a constant learning rate the weights keep jittering around where the loss is low; their running
average sits closer to it. That smooths the end of a run without lowering the lr, which (training
from scratch) would slow the learning itself.
"""

from __future__ import annotations

import copy

import torch


class WeightAverage:
    """`model` holds the average of every floating-point parameter and buffer (BatchNorm statistics too).

    The decay ramps up as (1 + n) / (10 + n) towards `decay`, so the first updates do not drag the
    average back to the random initial weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be between 0 and 1, got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        keep = self.current_decay()
        averaged, current, copied, sources = [], [], [], []
        for mine, theirs in zip(self.model.state_dict().values(), model.state_dict().values()):
            if mine.is_floating_point():
                averaged.append(mine)
                current.append(theirs.detach())
            else:
                copied.append(mine)
                sources.append(theirs)
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - keep)
        for mine, theirs in zip(copied, sources):
            mine.copy_(theirs)

    def state_dict(self) -> dict:
        return {"model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
