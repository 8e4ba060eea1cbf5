"""The small CNN `syncnorm train` trains: batch norm after every convolution."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def digits_cnn(norm: Callable[[int], nn.Module] = nn.BatchNorm2d, seed: int = 0) -> nn.Sequential:
    """3 conv + BN + ReLU blocks and a linear classifier for 8x8 digits (~25k parameters)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), norm(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), norm(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), norm(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
