"""The SyncBN autograd Function: all arithmetic and all communication of a layer call.

Forward (one collective)::

    (n_r, mu_r, M2_r) = moments of this worker's batch        # one pass over x
    (N, mu, M2)       = reducer.merge_moments(...)             # exact, count-weighted
    var               = M2 / N                                 # biased, normalizes
    y = (x - mu) * rsqrt(var + eps) * weight + bias

Backward (one collective), with xhat = (x - mu) * invstd::

    (sum dy, sum dy * xhat) over the *global* batch      = reducer.sum_across_workers(...)
    dx = weight * invstd * (dy - sum_dy / N - xhat * sum_dy_xhat / N)
    dweight = local sum dy * xhat,  dbias = local sum dy     # per worker; DDP adds them

Every pass over the activation is one of torch's own fused batch-norm kernels,
so a call reads and writes the activation as often as local batch norm does:
the statistics (``torch.batch_norm_update_stats``), the output (eval-mode
``batch_norm`` with the global statistics), the gradient sums
(``native_batch_norm_backward`` asked for the weight and bias gradients only),
and ``dx`` (eval-mode ``batch_norm`` as a per-channel affine map of ``x``, plus
``weight * invstd * dy``).  Like torch's own kernels, the output and ``dx``
passes fold the mean into a per-channel offset, which costs about
``eps_dtype * |mean| / std`` of relative precision.

``observe(local, total)``, when given, sees this worker's moments and the
merged ones of every call (for precise BN and monitoring).

Statistics are computed in float32 for half-precision inputs (float64 for
float64), and the output has the input's dtype and memory format.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from syncnorm.moments import Moments, local_moments, update_running_stats
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


def autocast_off(device_type: str) -> AbstractContextManager:
    """Autocast switched off, as cheaply as possible when it is not on anyway."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def local_gradient_sums(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum dy * xhat, sum dy)`` per channel over this worker's batch, with
    ``xhat = (x - mean) * invstd`` for the given (global) ``mean`` and ``invstd``.

    One fused pass: torch's batch-norm backward kernel asked for the weight and
    bias gradients only.  An empty batch sums to zeros.
    """
    if x.numel() == 0:
        return mean.new_zeros(mean.shape), mean.new_zeros(mean.shape)
    _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        dy, x, None, None, None, mean, invstd, True, 0.0, [False, True, True]
    )
    return sum_dy_xhat, sum_dy


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
        with autocast_off(x.device.type):
            xc = x if x.dtype == dtype else x.to(dtype)  # one upcast for half inputs, shared
            local = local_moments(xc, dtype)
            total = reducer.merge_moments(local, layer)
            check_enough_values(total, x.numel() // max(x.shape[1], 1), x.shape)
            if observe is not None:
                observe(local, total)
            if running_mean is not None and running_var is not None:
                update_running_stats(running_mean, running_var, total, average_factor)
            mean, var = total.mean.to(dtype), total.biased_var.to(dtype)
            # The fused eval-mode kernel normalizes with the given (here: global) statistics.
            y = torch.batch_norm(xc, _as(weight, dtype), _as(bias, dtype), mean, var, False, 0.0, eps,
                                 torch.backends.cudnn.enabled)  # fmt: skip
            invstd = (var + eps).rsqrt_()

        # the count stays in the transport's dtype: a 0-d divisor keeps the gradients' dtype
        ctx.save_for_backward(x, weight, mean, invstd, total.count)
        ctx.reducer = reducer
        ctx.layer = layer
        return y if y.dtype == x.dtype else y.to(x.dtype, memory_format=memory_format_of(x))

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, invstd, count = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = mean.dtype
        with autocast_off(x.device.type):
            xc, dyc = x.to(dtype), dy.to(dtype)
            sum_dy_xhat, sum_dy = local_gradient_sums(dyc, xc, mean, invstd)

            grad_x = None
            if need_x:
                totals = ctx.reducer.sum_across_workers(torch.cat([sum_dy, sum_dy_xhat]), ctx.layer)
                scale = invstd if weight is None else invstd * weight.to(dtype)
                # dx = scale * (dy - mean_dy - xhat * mean_dy_xhat), xhat = (x - mean) * invstd:
                # an affine map of x per channel (one fused kernel) plus scale * dy.
                # coefficients: -scale * (mean_dy, mean_dy_xhat * invstd)
                coefficients = (totals / count).view(2, -1).mul_(scale).neg_()
                shift, slope = coefficients.unbind()
                grad_x = torch.batch_norm(xc, slope.mul_(invstd), shift, mean, torch.ones_like(mean), False,
                                          0.0, 0.0, torch.backends.cudnn.enabled)  # fmt: skip
                grad_x.addcmul_(dyc, _channel_view(scale, x.dim()))
                if grad_x.dtype != x.dtype:
                    grad_x = grad_x.to(x.dtype, memory_format=memory_format_of(x))
            grad_w = sum_dy_xhat.to(weight.dtype) if need_w else None
            grad_b = sum_dy.to(weight.dtype) if need_b else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None
