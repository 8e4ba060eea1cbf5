"""The SyncBN autograd Function: all arithmetic and all communication of a layer call.

Forward (one collective)::

    (n_r, mu_r, M2_r) = moments of this worker's batch        # one pass over x
    (N, mu, M2)       = reducer.merge_moments(...)             # exact, count-weighted
    var               = M2 / N                                 # biased, normalizes
    y = (x - mu) * rsqrt(var + eps) * weight + bias

Backward (one collective), with xhat = (x - mu) * invstd::

    (sum dy, sum dy * (x - mu)) over the *global* batch   = reducer.sum_across_workers(...)
    dx = weight * invstd * (dy - sum_dy / N - (x - mu) * invstd**2 * sum_dy_xmu / N)
    dweight = local sum dy * xhat,  dbias = local sum dy     # per worker; DDP adds them

``observe(local, total)``, when given, sees this worker's moments and the
merged ones of every call (for precise BN and monitoring).

Statistics are computed in float32 for half-precision inputs (float64 for
float64), and the output has the input's dtype and memory format.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from syncnorm.moments import Moments, local_moments, reduction_dims, update_running_stats
from syncnorm.transports.base import LayerKey, StatsReducer


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (fp32, fp16, bf16)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channel_view(v: Tensor, ndim: int) -> Tensor:
    return v.view(1, -1, *([1] * (ndim - 2)))


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The memory format a result shaped like ``x`` should keep."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last if not x.is_contiguous() else torch.contiguous_format
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d if not x.is_contiguous() else torch.contiguous_format
    return torch.contiguous_format


def check_enough_values(total: Moments, local_count: int, input_shape: torch.Size) -> None:
    """Raise like torch's batch norm when the group holds at most one value per channel.

    Only a worker that itself holds at most one value per channel can be in a
    group whose total is at most one, so only such a worker reads the total
    back from the device; every other worker skips the host synchronization.
    All workers of the group then agree on whether to raise.
    """
    if local_count > 1:
        return
    if float(total.count) <= 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got input size "
            f"{input_shape} on this worker and {int(total.count)} value(s) per channel in "
            "the whole synchronization group"
        )


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the union of all workers' batches; see the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        average_factor: float,
        reducer: StatsReducer,
        layer: LayerKey,
        observe: Callable[[Moments, Moments], None] | None = None,
    ) -> Tensor:
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)  # one upcast for half inputs, shared by statistics and output
            local = local_moments(xc, dtype)
            total = reducer.merge_moments(local, layer)
            check_enough_values(total, x.numel() // max(x.shape[1], 1), x.shape)
            if observe is not None:
                observe(local, total)
            batch = Moments(total.count.to(dtype), total.mean.to(dtype), total.m2.to(dtype))
            invstd = torch.rsqrt(batch.biased_var + eps)
            if running_mean is not None and running_var is not None:
                update_running_stats(running_mean, running_var, batch, average_factor)

            scale = invstd if weight is None else invstd * weight.to(dtype)
            shift = -batch.mean * scale
            if bias is not None:
                shift = shift + bias.to(dtype)
            y = torch.addcmul(_channel_view(shift, x.dim()), xc, _channel_view(scale, x.dim()))

        ctx.save_for_backward(x, weight, batch.mean, invstd, batch.count)
        ctx.reducer = reducer
        ctx.layer = layer
        return y.to(x.dtype, memory_format=memory_format_of(x))

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, invstd, count = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = mean.dtype
        dims = reduction_dims(x)
        with torch.autocast(x.device.type, enabled=False):
            xmu = x.to(dtype) - _channel_view(mean, x.dim())
            dyc = dy.to(dtype)
            sum_dy = dyc.sum(dims)  # an empty batch sums to zeros
            sum_dy_xmu = (dyc * xmu).sum(dims)

            grad_x = None
            if need_x:
                c = mean.numel()
                totals = ctx.reducer.sum_across_workers(torch.cat([sum_dy, sum_dy_xmu]), ctx.layer)
                mean_dy = totals[:c] / count
                mean_dy_xmu = totals[c:] / count
                scale = invstd if weight is None else invstd * weight.to(dtype)
                grad_x = (
                    dyc
                    - _channel_view(mean_dy, x.dim())
                    - xmu * _channel_view(invstd.square() * mean_dy_xmu, x.dim())
                ) * _channel_view(scale, x.dim())
                grad_x = grad_x.to(x.dtype, memory_format=memory_format_of(x))
            grad_w = (sum_dy_xmu * invstd).to(weight.dtype) if need_w else None
            grad_b = sum_dy.to(weight.dtype) if need_b else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None
