"""Switchable Normalization (Luo, Ren, Peng & Zhang, ICLR 2019), batch branch synchronized."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from syncnorm.function import autocast_off, compute_dtype, memory_format_of
from syncnorm.norms.base import BatchBranchNorm, channel_view
from syncnorm.transports.base import StatsReducer

BRANCHES = ("instance", "layer", "batch")
"""The order of the entries of ``mean_weight`` and ``var_weight``."""


class SyncSwitchableNorm2d(BatchBranchNorm):
    r"""Switchable norm whose batch statistics are those of all workers' batches.

    For an input ``x`` of shape ``(N, C, H, W)``, three pairs of statistics, all
    with biased variances::

        mu_in,  var_in   per sample and channel, over (H, W)        shape (N, C)
        mu_ln,  var_ln   per sample, over (C, H, W)                 shape (N,)
        mu_bn,  var_bn   per channel, over (N, H, W)                shape (C,)

    are mixed with two separate softmaxes over learned logits ``mean_weight``
    and ``var_weight`` (order: instance, layer, batch; initialised equal)::

        w  = softmax(mean_weight),   w' = softmax(var_weight)
        mu = w_in * mu_in + w_ln * mu_ln + w_bn * mu_bn
        var = w'_in * var_in + w'_ln * var_ln + w'_bn * var_bn
        y  = (x - mu) / sqrt(var + eps) * weight + bias

    **Synchronized:** only ``mu_bn`` and ``var_bn``: the mean and biased variance
    of the union of every worker's batch in the group (each value weighing the
    same; uneven and empty batches are exact), one collective in forward and one
    in backward per call.  The instance and layer statistics are per sample and
    never communicated.  (The paper obtains the layer and batch statistics from
    the instance ones; here each is computed directly, with the same values and
    without the cancellation of ``E[x^2] - E[x]^2``.)

    **Running statistics** belong to the batch branch: ``running_mean`` and the
    global *unbiased* ``running_var``, updated as by ``torch.nn.BatchNorm2d``.
    In eval the batch branch uses them, while the instance and layer branches
    still use each sample's own statistics.  Gradients of ``weight``, ``bias``,
    ``mean_weight`` and ``var_weight`` are this worker's share (DDP adds them up).

    Args:
        num_features: channels C.
        eps, momentum, affine, track_running_stats, device, dtype: as in
            ``torch.nn.BatchNorm2d``.
        process_group, reducer: as in :class:`syncnorm.SyncBatchNorm`.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        reducer: StatsReducer | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, track_running_stats, process_group, reducer, device, dtype
        )
        factory = {"device": device, "dtype": dtype}
        self.register_affine(affine, **factory)
        self.mean_weight = nn.Parameter(torch.ones(len(BRANCHES), **factory))
        self.var_weight = nn.Parameter(torch.ones(len(BRANCHES), **factory))

    def branch_weights(self) -> dict[str, tuple[float, float]]:
        """``{branch: (mean weight, variance weight)}`` after the softmaxes, for inspection."""
        with torch.no_grad():
            w = torch.softmax(self.mean_weight.double(), 0).tolist()
            v = torch.softmax(self.var_weight.double(), 0).tolist()
        return {name: (w[i], v[i]) for i, name in enumerate(BRANCHES)}

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        dtype = compute_dtype(x)
        with autocast_off(x.device.type):
            xc = x.to(dtype)  # one upcast for half inputs, shared by every branch
            mean_bn, var_bn = self.batch_statistics(xc)
            assert var_bn is not None
            var_in, mean_in = torch.var_mean(xc, dim=(2, 3), keepdim=True, correction=0)
            var_ln, mean_ln = torch.var_mean(xc, dim=(1, 2, 3), keepdim=True, correction=0)
            w = torch.softmax(self.mean_weight.to(dtype), 0)
            v = torch.softmax(self.var_weight.to(dtype), 0)
            mean = w[0] * mean_in + w[1] * mean_ln + w[2] * channel_view(mean_bn)
            var = v[0] * var_in + v[1] * var_ln + v[2] * channel_view(var_bn)
            scale = torch.rsqrt(var + self.eps)
            if self.weight is not None:
                scale = scale * channel_view(self.weight.to(dtype))
            y = (xc - mean) * scale
            if self.bias is not None:
                y = y + channel_view(self.bias.to(dtype))
        return y.to(x.dtype, memory_format=memory_format_of(x))
