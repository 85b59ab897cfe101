"""Shared fixtures: tiny float64 models whose dense Hessian is the oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture
def tiny_mlp() -> nn.Module:
    """A 4-5-3 tanh MLP in float64 (38 parameters): smooth, so finite checks are exact."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.fixture
def tiny_bn_cnn() -> nn.Module:
    """A conv + BatchNorm + linear float64 model with non-trivial running statistics."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double()
    model.train()
    with torch.no_grad():  # give BN running statistics that differ from the defaults
        for _ in range(3):
            model(torch.randn(8, 1, 6, 6, dtype=torch.float64) * 2 + 1)
    return model


@pytest.fixture
def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(23, 4, generator=g, dtype=torch.float64), torch.randint(
        3, (23,), generator=g
    )


@pytest.fixture
def tiny_image_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(17, 1, 6, 6, generator=g, dtype=torch.float64)
    return x, torch.randint(3, (17,), generator=g)
