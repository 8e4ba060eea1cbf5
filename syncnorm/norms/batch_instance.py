"""Batch-Instance Normalization (Nam & Kim, NeurIPS 2018), batch branch synchronized."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from syncnorm.function import autocast_off, compute_dtype, memory_format_of
from syncnorm.norms.base import BatchBranchNorm, channel_view
from syncnorm.transports.base import StatsReducer


class SyncBatchInstanceNorm2d(BatchBranchNorm):
    r"""Batch-instance norm whose batch statistics are those of all workers' batches.

    For an input ``x`` of shape ``(N, C, H, W)``::

        x_bn = (x - mu_B) / sqrt(var_B + eps)        # mu_B, var_B per channel over (N, H, W)
        x_in = (x - mu_I) / sqrt(var_I + eps)        # mu_I, var_I per sample and channel over (H, W)
        y    = (rho * x_bn + (1 - rho) * x_in) * weight + bias

    with a learned per-channel ``rho`` in [0, 1] (initialised to 1: the layer
    starts as batch norm).  Both variances are biased.

    **Synchronized:** only ``mu_B`` and ``var_B``, which are the mean and biased
    variance of the union of every worker's batch in the group, each value
    weighing the same (uneven and empty batches are exact), with one collective
    in forward and one in backward per call.  The instance branch is per sample
    and needs no communication.  **Running statistics** (``running_mean``, the
    global *unbiased* ``running_var``) are updated as by ``torch.nn.BatchNorm2d``
    and used by the batch branch in eval; the instance branch always uses the
    sample's own statistics.  Gradients of ``weight``, ``bias`` and ``rho`` are
    this worker's share (DDP adds them up).

    The paper clips ``rho`` to [0, 1] after every optimizer step; do the same
    with :func:`clip_rho_after_steps` (or :meth:`clip_rho_` after ``step()``).
    The forward also clamps ``rho`` to [0, 1], which changes nothing while it is
    clipped and keeps the layer valid if it is not.

    Without a reducer, and without a torch.distributed group of several ranks,
    the layer computes the same formula on the local batch.

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
        self.rho = nn.Parameter(torch.ones(num_features, **factory))

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        dtype = compute_dtype(x)
        with autocast_off(x.device.type):
            xc = x.to(dtype)  # one upcast for half inputs, shared by every branch
            mean_b, var_b = self.batch_statistics(xc)
            assert var_b is not None
            x_bn = (xc - channel_view(mean_b)) * channel_view(torch.rsqrt(var_b + self.eps))
            var_i, mean_i = torch.var_mean(xc, dim=(2, 3), keepdim=True, correction=0)
            x_in = (xc - mean_i) * torch.rsqrt(var_i + self.eps)
            rho = channel_view(self.rho.to(dtype).clamp(0.0, 1.0))
            y = x_in + rho * (x_bn - x_in)
            if self.weight is not None:
                y = y * channel_view(self.weight.to(dtype)) + channel_view(self.bias.to(dtype))
        return y.to(x.dtype, memory_format=memory_format_of(x))

    @torch.no_grad()
    def clip_rho_(self) -> None:
        """Clip ``rho`` to [0, 1] in place, as the paper does after each update."""
        self.rho.clamp_(0.0, 1.0)


def clip_rho_after_steps(optimizer: torch.optim.Optimizer, model: nn.Module) -> RemovableHandle:
    """After every ``optimizer.step()``, clip the ``rho`` of each
    :class:`SyncBatchInstanceNorm2d` in ``model`` to [0, 1] (the paper's update rule).

    Returns the hook's handle; ``handle.remove()`` stops it.
    """
    layers = _batch_instance_layers(model.modules())
    if not layers:
        raise ValueError("the model has no SyncBatchInstanceNorm2d layers whose rho could be clipped")

    def clip(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        for layer in layers:
            layer.clip_rho_()

    return optimizer.register_step_post_hook(clip)


def _batch_instance_layers(modules: Iterable[nn.Module]) -> list[SyncBatchInstanceNorm2d]:
    return [m for m in modules if isinstance(m, SyncBatchInstanceNorm2d)]
