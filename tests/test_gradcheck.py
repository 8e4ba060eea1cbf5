"""torch.autograd.gradcheck in float64 across ranks.

Rank 0 runs gradcheck on its own input, weight and bias; the other ranks hold
fixed inputs and mirror every forward and backward rank 0 makes (told by a
broadcast before each), backpropagating zeros.  The function checked is then
exactly "rank 0's output as a function of rank 0's input, with the other
ranks' batches in the statistics", and both its numerical and its analytical
Jacobian go through the real collectives.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from syncnorm import SyncBatchNorm, TorchDistributedReducer
from syncnorm.function import SyncBatchNormFunction

STOP, FORWARD, BACKWARD = 0, 1, 2


def _tell(command: int) -> None:
    dist.broadcast(torch.tensor([command]), src=0)


def _gradcheck_across_ranks(rank: int, world_size: int, sizes: tuple[int, ...], primitive: str) -> bool:
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(sizes[rank], 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    layer = SyncBatchNorm(3, dtype=torch.float64, reducer=TorchDistributedReducer(primitive=primitive))
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=g)
        layer.bias.normal_(generator=g)
    weight, bias = layer.weight.detach(), layer.bias.detach()

    if rank == 0:

        def checked(inp: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            _tell(FORWARD)
            y = _functional(layer, inp, w, b)
            if y.requires_grad:
                y.register_hook(lambda grad: (_tell(BACKWARD), grad)[1])
            return y

        inputs = (x, weight.clone().requires_grad_(True), bias.clone().requires_grad_(True))
        try:
            return torch.autograd.gradcheck(checked, inputs, eps=1e-6, atol=1e-7, check_undefined_grad=False)
        finally:
            _tell(STOP)  # release the followers even when the check fails

    y = None
    while True:
        command = torch.empty(1, dtype=torch.int64)
        dist.broadcast(command, src=0)
        if command.item() == STOP:
            return True
        if command.item() == FORWARD:
            y = _functional(layer, x, weight.requires_grad_(True), bias.requires_grad_(True))
        else:
            torch.autograd.grad(y, (x, weight, bias), torch.zeros_like(y), retain_graph=True)


def _functional(layer: SyncBatchNorm, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The layer's training computation with explicit parameters and no running buffers."""
    return SyncBatchNormFunction.apply(x, w, b, None, None, layer.eps, 0.0, layer.reducer, layer.layer_key)


@pytest.mark.parametrize(("sizes", "primitive"), [((2, 3), "all_gather"), ((3, 0, 1), "all_reduce")])
def test_gradcheck_float64_across_ranks(ranks, sizes: tuple[int, ...], primitive: str) -> None:
    assert ranks(len(sizes)).run(_gradcheck_across_ranks, sizes, primitive, timeout=120) == [True] * len(
        sizes
    )
