"""The weight average the trainer evaluates and saves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maskrcnn.engine.ema import WeightAverage


def test_average_follows_the_ramped_recurrence_for_parameters_and_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    average = WeightAverage(model, decay=0.5)
    expected = {k: v.clone().double() for k, v in model.state_dict().items() if v.is_floating_point()}
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(2, 3, 8, 8))  # moves the BatchNorm running statistics
        keep = min(0.5, (1 + step) / (10 + step))  # 0.18, 0.25, 0.31, 0.36, 0.4: the ramp, then the cap
        for key, value in model.state_dict().items():
            if key in expected:
                expected[key] = keep * expected[key] + (1 - keep) * value.double()
        average.update(model)
    state = average.model.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key].double(), value, rtol=1e-6, atol=1e-6)
    assert state["1.num_batches_tracked"] == model.state_dict()["1.num_batches_tracked"] == 5  # copied
    assert not any(p.requires_grad for p in average.model.parameters())
    assert not average.model.training


def test_average_never_touches_the_trained_model_and_restores_from_its_state():
    model = nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(model)
    assert torch.equal(model.bias, before["bias"]) and torch.equal(model.weight, before["weight"] + 1.0)
    restored = WeightAverage(nn.Linear(3, 2), decay=0.9)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 1
    assert all(torch.equal(a, b) for a, b in zip(restored.model.state_dict().values(),
                                                  average.model.state_dict().values()))


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_decay_outside_zero_to_one_is_refused(decay):
    with pytest.raises(ValueError, match="between 0 and 1"):
        WeightAverage(nn.Linear(1, 1), decay)
