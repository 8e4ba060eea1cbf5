"""A DDP-wrapped CNN trained with SGD matches one process on the concatenated batch."""

from __future__ import annotations

import torch
from torch import nn

from syncnorm import convert_sync_batchnorm

PER_RANK = 4
STEPS = 5


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )  # fmt: skip


def _batch(step: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    n = PER_RANK * world_size
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _train(model: nn.Module, rank: int | None, world_size: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for step in range(STEPS):
        x, y = _batch(step, world_size)
        if rank is not None:
            x, y = x[rank * PER_RANK : (rank + 1) * PER_RANK], y[rank * PER_RANK : (rank + 1) * PER_RANK]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def _ddp_rank(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    model = nn.parallel.DistributedDataParallel(convert_sync_batchnorm(_cnn()))
    _train(model, rank, world_size)
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def test_ddp_cnn_five_sgd_steps_match_one_process(ranks) -> None:
    reference = _cnn()
    _train(reference, None, 2)
    for state in ranks(2).run(_ddp_rank):
        assert list(state) == list(reference.state_dict())
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-5, msg=key)
