"""Other synchronized batch norm designs, re-implemented for the benchmarks.

Each is written here from its published algorithm in plain tensor operations (the
originals rely on CUDA kernels that have no CPU build), so that syncnorm can be
timed next to them on the same machine, the same transport and the same input.
They are benchmark baselines, not part of syncnorm, and they assume what their
originals assume for exactness: every worker holds a batch of the same size.

``torch`` -- ``torch.nn.SyncBatchNorm`` (``torch/nn/modules/_functions.py``):
    forward: local mean and invstd, one all_gather of ``(mean, invstd, count)``
    (2C + 1 values in the input's dtype), every worker merges them weighted by
    count (``batch_norm_gather_stats_with_counts``: var_r = invstd_r**-2 - eps);
    backward: one all_reduce of ``(sum dy, sum dy * (x - mean))`` (2C values), then
    elementwise.  ``weight``/``bias`` gradients are the worker's own share.

``detectron2`` -- ``detectron2.layers.NaiveSyncBatchNorm`` with ``stats_mode=""``:
    forward: local ``(E[x], E[x**2])``, one differentiable all-reduce of those 2C
    values divided by the world size (every worker weighs the same; exact only for
    equal batch sizes), ``var = E[x**2] - E[x]**2``, ``y = x * scale + shift``;
    backward: autograd through that graph, whose only collective is the
    all-reduce's backward, another all_reduce of 2C values.  The differentiable
    all-reduce is fvcore's ``nn.distributed.differentiable_all_reduce``: its
    forward is an all_gather followed by a sum ("I don't trust in-place
    operations"), its backward an all_reduce.  Keras' ``SyncBatchNormalization``
    computes the same moments with three all-reduce SUMs (sum x, sum x**2, count,
    weighted by count) and differentiates through them in the same way.

``mmcv`` -- ``mmcv.ops.SyncBatchNorm`` (``mmcv/ops/sync_bn.py`` and its CUDA kernels):
    forward: two passes, an all_reduce of the local means (C values, divided by
    the world size), then an all_reduce of the local ``mean((x - mean)**2)`` about
    that global mean (C values, divided by the world size); keeps ``norm = xhat``
    and ``std`` for backward; backward: ``sum dy * norm`` and ``sum dy``, each
    all-reduced by its own call (2 x C values) and divided by the world size, then
    ``dx = weight * (dy - (grad_weight * norm + grad_bias) / n_local) / std``.
    Four collectives per layer call; the returned parameter gradients are the
    group's average.

Running statistics are updated as each original does: torch and mmcv with the
unbiased variance of the global batch, detectron2 with the biased one.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from syncnorm.transports.torch_distributed import all_gather_into

Design = Literal["torch", "detectron2", "mmcv"]
DESIGNS: tuple[Design, ...] = ("torch", "detectron2", "mmcv")


def _dims(x: Tensor) -> list[int]:
    """Every dimension but the channels."""
    return [0, *range(2, x.dim())]


def _per_channel(v: Tensor, x: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _all_gather_rows(payload: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    world = dist.get_world_size(group)
    out = payload.new_empty(world * payload.numel())
    all_gather_into(out, payload.contiguous(), group)
    return out.view(world, -1)


class TorchDesignFunction(torch.autograd.Function):
    """torch.nn.SyncBatchNorm's algorithm: all_gather (mean, invstd, count), all_reduce grads."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        momentum: float,
        group: dist.ProcessGroup | None,
    ) -> Tensor:
        c = x.shape[1]
        var, mean = torch.var_mean(x, _dims(x), correction=0)  # batch_norm_stats
        count = x.new_full((1,), x.numel() // c)
        rows = _all_gather_rows(torch.cat([mean, torch.rsqrt(var + eps), count]), group)
        means, invstds, counts = rows[:, :c], rows[:, c : 2 * c], rows[:, 2 * c :]
        # batch_norm_gather_stats_with_counts: each worker's variance back from its invstd,
        # then the count-weighted merge (torch folds the rows in one by one; same sums).
        n = counts.sum()
        global_mean = (counts * means).sum(0) / n
        global_var = (counts * (invstds.pow(-2) - eps + (means - global_mean).square())).sum(0) / n
        invstd = torch.rsqrt(global_var + eps)
        if running_mean is not None and running_var is not None:
            running_mean.mul_(1 - momentum).add_(global_mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(global_var * (n / (n - 1)), alpha=momentum)
        ctx.save_for_backward(x, weight, global_mean, invstd, n)
        ctx.group = group
        # batch_norm_elemt
        return (x - _per_channel(global_mean, x)) * _per_channel(invstd * weight, x) + _per_channel(bias, x)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, invstd, n = ctx.saved_tensors
        c = x.shape[1]
        xmu = x - _per_channel(mean, x)
        # batch_norm_backward_reduce: local sums and the (local) parameter gradients
        sum_dy = dy.sum(_dims(x))
        sum_dy_xmu = (dy * xmu).sum(_dims(x))
        grad_weight, grad_bias = sum_dy_xmu * invstd, sum_dy
        totals = torch.cat([sum_dy, sum_dy_xmu])
        dist.all_reduce(totals, group=ctx.group)
        mean_dy, mean_dy_xmu = totals[:c] / n, totals[c:] / n
        # batch_norm_backward_elemt
        grad_x = (
            dy - _per_channel(mean_dy, x) - xmu * _per_channel(invstd.square() * mean_dy_xmu, x)
        ) * _per_channel(invstd * weight, x)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class DifferentiableAllReduce(torch.autograd.Function):
    """fvcore's differentiable all-reduce: all_gather + sum forward, all_reduce backward."""

    @staticmethod
    def forward(ctx: Any, v: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return _all_gather_rows(v, group).sum(0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad = grad.clone()  # fvcore reduces in place; a 2C copy keeps autograd's buffer intact
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def detectron2_batch_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    eps: float,
    momentum: float,
    group: dist.ProcessGroup | None,
) -> Tensor:
    """NaiveSyncBatchNorm (stats_mode=""): equal weight per worker, backward by autograd."""
    c = x.shape[1]
    mean = x.mean(_dims(x))
    meansqr = (x * x).mean(_dims(x))
    vec = DifferentiableAllReduce.apply(torch.cat([mean, meansqr]), group) * (
        1.0 / dist.get_world_size(group)
    )
    mean, meansqr = vec[:c], vec[c:]
    var = meansqr - mean * mean
    scale = weight * torch.rsqrt(var + eps)
    shift = bias - mean * scale
    if running_mean is not None and running_var is not None:
        running_mean += momentum * (mean.detach() - running_mean)
        running_var += momentum * (var.detach() - running_var)
    return x * _per_channel(scale, x) + _per_channel(shift, x)


class MmcvDesignFunction(torch.autograd.Function):
    """mmcv's SyncBatchNorm: two-pass forward (2 all_reduces), 2 all_reduces backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        momentum: float,
        group: dist.ProcessGroup | None,
    ) -> Tensor:
        world = dist.get_world_size(group)
        n_local = x.numel() // x.shape[1]
        mean = x.mean(_dims(x))  # sync_bn_forward_mean
        dist.all_reduce(mean, group=group)
        mean /= world
        var = (x - _per_channel(mean, x)).square().mean(_dims(x))  # sync_bn_forward_var
        dist.all_reduce(var, group=group)
        var /= world
        std = torch.sqrt(var + eps)  # sync_bn_forward_output
        norm = (x - _per_channel(mean, x)) / _per_channel(std, x)
        if running_mean is not None and running_var is not None:
            count = n_local * world
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * (count / (count - 1)), alpha=momentum)
        ctx.save_for_backward(norm, std, weight)
        ctx.group, ctx.world, ctx.n_local = group, world, n_local
        return norm * _per_channel(weight, x) + _per_channel(bias, x)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        norm, std, weight = ctx.saved_tensors
        grad_weight = (dy * norm).sum(_dims(dy))  # sync_bn_backward_param
        grad_bias = dy.sum(_dims(dy))
        dist.all_reduce(grad_weight, group=ctx.group)
        dist.all_reduce(grad_bias, group=ctx.group)
        grad_weight /= ctx.world
        grad_bias /= ctx.world
        # sync_bn_backward_data
        grad_x = (
            _per_channel(weight, dy)
            * (dy - (_per_channel(grad_weight, dy) * norm + _per_channel(grad_bias, dy)) / ctx.n_local)
            / _per_channel(std, dy)
        )
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class BaselineBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that trains with one of the :data:`DESIGNS` (eval: running stats).

    Example::

        layer = BaselineBatchNorm2d(64, design="mmcv")   # inside an initialized process group
        layer(x).backward(dy)
    """

    def __init__(
        self, num_features: int, design: Design, process_group: dist.ProcessGroup | None = None, **kwargs: Any
    ) -> None:
        if design not in DESIGNS:
            raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
        super().__init__(num_features, **kwargs)
        self.design = design
        self.process_group = process_group

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        if self.weight is None or self.bias is None:
            raise ValueError("the baselines need affine=True")
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as in torch
                momentum = 1.0 / float(self.num_batches_tracked)
        args = (x, self.weight, self.bias, self.running_mean, self.running_var, self.eps, momentum,
                self.process_group)  # fmt: skip
        if self.design == "torch":
            return TorchDesignFunction.apply(*args)
        if self.design == "detectron2":
            return detectron2_batch_norm(*args)
        return MmcvDesignFunction.apply(*args)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, design={self.design}"
