"""The small CNN `syncnorm train` trains: a norm layer (batch norm by default) after every convolution."""

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


GROUPS = 8
"""GroupNorm's group count in the digits CNN (2, 4 and 8 channels per group)."""


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """The layer factory for a ``--norm`` choice (see :class:`syncnorm.train.TrainConfig`).

    ``"sync"`` and ``"local"`` both build ``torch.nn.BatchNorm2d`` (the training
    loop converts it for ``"sync"``, so checkpoints load into the plain model).
    """
    if norm in ("sync", "local"):
        return nn.BatchNorm2d
    if norm == "switchable":
        from syncnorm.norms import SyncSwitchableNorm2d

        return SyncSwitchableNorm2d
    if norm == "batch-instance":
        from syncnorm.norms import SyncBatchInstanceNorm2d

        return SyncBatchInstanceNorm2d
    if norm == "group":
        return lambda channels: nn.GroupNorm(min(GROUPS, channels), channels)
    if norm == "layer":
        return lambda channels: nn.GroupNorm(1, channels)
    raise ValueError(f"unknown norm {norm!r}")
