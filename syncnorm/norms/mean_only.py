"""Mean-only batch norm (Salimans & Kingma, 2016), the companion of weight normalization."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from syncnorm.function import autocast_off, compute_dtype, memory_format_of
from syncnorm.norms.base import BatchBranchNorm, channel_view
from syncnorm.transports.base import StatsReducer


class SyncMeanOnlyBatchNorm2d(BatchBranchNorm):
    r"""Mean-only batch norm whose batch mean is that of all workers' batches.

    For an input ``x`` of shape ``(N, C, H, W)``::

        y = x - mu_B + bias            # mu_B per channel over (N, H, W)

    No division by a standard deviation and no scale: in Salimans & Kingma's
    "Weight Normalization" (2016) the scale lives in the preceding layer's
    weight-normalized weights ``w = g * v / ||v||``, and subtracting the batch
    mean adds back the centring that weight normalization alone lacks.  Pair it
    with :func:`torch.nn.utils.parametrizations.weight_norm` on the convolution
    before it (whose own bias is then redundant)::

        from torch.nn.utils.parametrizations import weight_norm

        block = nn.Sequential(
            weight_norm(nn.Conv2d(64, 128, 3, padding=1, bias=False)),  # scale: g per output channel
            syncnorm.SyncMeanOnlyBatchNorm2d(128),                      # shift: bias
            nn.ReLU(),
        )

    **Synchronized:** ``mu_B``, the mean of the union of every worker's batch in
    the group (each value weighing the same; uneven and empty batches are
    exact), one collective in forward and one in backward per call; the
    collectives carry the variance as well, which this layer does not use.
    Training needs more than one value per channel in the whole group, as batch
    norm does.  **Running statistics:** ``running_mean`` only, updated with
    ``momentum`` as torch's batch norm updates it (``None``: cumulative
    average), and used in eval.  The ``bias`` gradient is this worker's share.

    Args:
        num_features: channels C.
        momentum, track_running_stats, device, dtype: as in ``torch.nn.BatchNorm2d``.
        affine: learn ``bias`` (there is no ``weight``).
        process_group, reducer: as in :class:`syncnorm.SyncBatchNorm`.
    """

    tracks_variance = False

    def __init__(
        self,
        num_features: int,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        reducer: StatsReducer | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            num_features, 0.0, momentum, track_running_stats, process_group, reducer, device, dtype
        )
        self.register_affine(affine, weight=False, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        dtype = compute_dtype(x)
        with autocast_off(x.device.type):
            xc = x.to(dtype)
            mean, _ = self.batch_statistics(xc)
            y = xc - channel_view(mean)
            if self.bias is not None:
                y = y + channel_view(self.bias.to(dtype))
        return y.to(x.dtype, memory_format=memory_format_of(x))

    @classmethod
    def _options_from(cls, source: _BatchNorm) -> dict[str, Any]:
        # weight, running_var and eps have no counterpart here and are dropped.
        return {"affine": source.affine}

    def extra_repr(self) -> str:
        name = f", layer_name={self.layer_name!r}" if self.layer_name else ""
        return (
            f"{self.num_features}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}{name}"
        )
