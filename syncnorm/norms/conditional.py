"""Conditional batch norm (de Vries et al., 2017; Perez et al., 2017), batch branch synchronized."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from syncnorm.function import autocast_off, compute_dtype, memory_format_of
from syncnorm.norms.base import BatchBranchNorm, channel_view
from syncnorm.transports.base import StatsReducer


class SyncConditionalBatchNorm2d(BatchBranchNorm):
    r"""Batch norm whose scale and shift are predicted from a condition per sample,
    with batch statistics of all workers' batches.

    ``layer(x, condition)`` for ``x`` of shape ``(N, C, H, W)``::

        x_bn     = (x - mu_B) / sqrt(var_B + eps)      # per channel over (N, H, W), biased
        gamma_n  = weight + e_n @ weight_delta          # (C,) for sample n
        beta_n   = bias   + e_n @ bias_delta
        y[n]     = gamma_n * x_bn[n] + beta_n

    where ``weight_delta`` and ``bias_delta`` have shape ``(num_conditions, C)``
    and start at zero, so the layer starts as batch norm with ``gamma = 1,
    beta = 0`` (de Vries et al. predict such deltas on top of the batch norm
    parameters).  ``e_n`` comes from ``condition``, and its dtype selects how:

    * an **integer** tensor of shape ``(N,)`` holds class indices in
      ``[0, num_conditions)``: ``e_n`` is the one-hot vector of the class, i.e.
      ``gamma_n = weight + weight_delta[class_n]`` (an embedding lookup;
      class-conditional batch norm);
    * a **floating-point** tensor of shape ``(N, num_conditions)`` is a
      condition vector (e.g. a text or task embedding): ``e_n`` is that row, so
      ``gamma`` and ``beta`` are a learned linear map of it (FiLM's generator
      ends in such a map).

    **Synchronized:** ``mu_B`` and ``var_B``, the mean and biased variance of
    the union of every worker's batch in the group (each value weighing the same;
    uneven and empty batches are exact), one collective in forward and one in
    backward per call.  The conditioning is per sample.  **Running statistics**
    (``running_mean``, global *unbiased* ``running_var``) are updated as by
    ``torch.nn.BatchNorm2d`` and used in eval.  Parameter gradients are this
    worker's share (DDP adds them up).

    The class-index range check reads the indices' minimum and maximum on the
    host (a device synchronization on accelerators): an out-of-range index raises
    ``ValueError`` instead of a device-side assertion.

    Args:
        num_features: channels C.
        num_conditions: the number of classes, or the length of a condition vector.
        eps, momentum, track_running_stats, device, dtype: as in ``torch.nn.BatchNorm2d``.
        process_group, reducer: as in :class:`syncnorm.SyncBatchNorm`.
    """

    def __init__(
        self,
        num_features: int,
        num_conditions: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        reducer: StatsReducer | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(num_conditions, int) or num_conditions < 1:
            raise ValueError(f"num_conditions must be a positive int, got {num_conditions!r}")
        super().__init__(
            num_features, eps, momentum, track_running_stats, process_group, reducer, device, dtype
        )
        self.num_conditions = num_conditions
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.weight_delta = nn.Parameter(torch.zeros(num_conditions, num_features, **factory))
        self.bias_delta = nn.Parameter(torch.zeros(num_conditions, num_features, **factory))

    def forward(self, x: Tensor, condition: Tensor) -> Tensor:
        self.check_input(x)
        self.check_condition(condition, x.shape[0])
        dtype = compute_dtype(x)
        with autocast_off(x.device.type):
            xc = x.to(dtype)
            mean, var = self.batch_statistics(xc)
            assert var is not None
            x_bn = (xc - channel_view(mean)) * channel_view(torch.rsqrt(var + self.eps))
            gamma, beta = self.scale_and_shift(condition, dtype)
            y = x_bn * gamma[:, :, None, None] + beta[:, :, None, None]
        return y.to(x.dtype, memory_format=memory_format_of(x))

    def scale_and_shift(self, condition: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(gamma, beta)``, each of shape ``(N, C)``, for a checked ``condition``."""
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        if condition.is_floating_point():
            e = condition.to(dtype)
            return weight + e @ self.weight_delta.to(dtype), bias + e @ self.bias_delta.to(dtype)
        return (
            weight + F.embedding(condition, self.weight_delta.to(dtype)),
            bias + F.embedding(condition, self.bias_delta.to(dtype)),
        )

    def check_condition(self, condition: Tensor, batch_size: int) -> None:
        """Raise ``ValueError`` unless ``condition`` is ``batch_size`` class indices in
        range, or a float tensor ``(batch_size, num_conditions)``."""
        where = self.layer_key.describe()
        if not isinstance(condition, Tensor):
            raise ValueError(f"{where}: the condition must be a tensor, got {type(condition).__name__}")
        if condition.is_floating_point():
            if tuple(condition.shape) != (batch_size, self.num_conditions):
                raise ValueError(
                    f"{where}: a floating-point condition is a condition vector per sample and must have "
                    f"shape (N, num_conditions) = ({batch_size}, {self.num_conditions}), got "
                    f"{tuple(condition.shape)}; pass class indices as an integer tensor of shape (N,)"
                )
            return
        if condition.dtype == torch.bool or condition.is_complex():
            raise ValueError(
                f"{where}: the condition must be integer class indices of shape (N,) or a floating-point "
                f"tensor of shape (N, num_conditions), got dtype {condition.dtype}"
            )
        if tuple(condition.shape) != (batch_size,):
            raise ValueError(
                f"{where}: integer class indices must have shape (N,) = ({batch_size},), got "
                f"{tuple(condition.shape)}; pass condition vectors as a floating-point tensor"
            )
        if batch_size:
            low, high = int(condition.min()), int(condition.max())
            if low < 0 or high >= self.num_conditions:
                bad = low if low < 0 else high
                raise ValueError(
                    f"{where}: class index {bad} is out of range for num_conditions={self.num_conditions} "
                    f"(indices must be in [0, {self.num_conditions - 1}])"
                )

    @classmethod
    def _options_from(cls, source: _BatchNorm) -> dict[str, Any]:
        # weight and bias are always learned here; an affine=False source starts them at 1 and 0.
        return {"eps": source.eps}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_conditions={self.num_conditions}"
