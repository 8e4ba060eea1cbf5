"""Numerical stability and mixed precision."""

from __future__ import annotations

import pytest
import torch

from syncnorm import SyncBatchNorm, TorchDistributedReducer, convert_sync_batchnorm

SIZES = (6, 10)


def _large_mean_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return (torch.randn(sum(SIZES), 3, 4, 4, generator=g, dtype=torch.float64) + 1e4).float()


def _large_mean_stats(rank: int, world_size: int, primitive: str) -> tuple[torch.Tensor, torch.Tensor]:
    layer = SyncBatchNorm(3, momentum=1.0, reducer=TorchDistributedReducer(primitive=primitive))
    y = layer(torch.split(_large_mean_batch(), SIZES)[rank])
    return layer.running_var.clone(), y.detach()


@pytest.mark.parametrize("primitive", ["all_gather", "all_reduce"])
def test_mean_1e4_fp32_variance_within_1e_3_of_fp64(ranks, primitive: str) -> None:
    x = _large_mean_batch().double()  # the same fp32 values, as fp64
    reference_var = x.var(dim=(0, 2, 3), correction=1)
    reference_y = torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5)
    results = ranks(2).run(_large_mean_stats, primitive)
    for rank, (running_var, y) in enumerate(results):
        # momentum=1: running_var is the global unbiased batch variance
        torch.testing.assert_close(running_var.double(), reference_var, rtol=1e-3, atol=0)
        torch.testing.assert_close(y.double(), torch.split(reference_y, SIZES)[rank], rtol=0, atol=2e-3)


def _autocast_step(rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    model = _autocast_model(sync=True)
    x = torch.split(_autocast_batch(), (3, 5))[rank]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    return y.detach(), model[1].running_mean.clone(), model[1].running_var.clone()


def _autocast_model(sync: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
    return convert_sync_batchnorm(model) if sync else model


def _autocast_batch() -> torch.Tensor:
    return torch.randn(8, 2, 5, 5, generator=torch.Generator().manual_seed(3))


def test_autocast_bf16_accumulates_in_fp32_and_returns_bf16(ranks) -> None:
    reference = _autocast_model(sync=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_y = reference(_autocast_batch())
    results = ranks(2).run(_autocast_step)
    for rank, (y, running_mean, running_var) in enumerate(results):
        assert y.dtype == torch.bfloat16
        assert running_mean.dtype == torch.float32
        torch.testing.assert_close(y.float(), torch.split(ref_y.float(), (3, 5))[rank], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(running_mean, reference[1].running_mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(running_var, reference[1].running_var, rtol=1e-4, atol=1e-4)
