"""Exact gradients with uneven per-worker batch sizes under DDP.

DDP averages gradients with equal weight per worker, so with per-worker batch
sizes ``b_r`` and each worker's loss the mean over its own batch, the step is
not the step of the global batch.  Re-weighting the gradients afterwards does
not fix it under SyncBN: its backward mixes every worker's output gradients
through the global sums, so those gradients must carry the same scale on every
worker *before* backward.  :class:`GlobalBatchMean` therefore scales the loss::

    loss_r = W / N * sum_{i in batch r} l_i,      N = sum_r b_r

so DDP's average ``1/W sum_r grad(loss_r)`` is the gradient of the mean loss over
the concatenated global batch.  ``N`` takes one scalar round through the same
transport as the SyncBN layers (recorded and shadowed by
:class:`syncnorm.SyncBatchNormJoin` like theirs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from syncnorm.batchnorm import SyncBatchNorm
from syncnorm.norms.base import BatchBranchNorm
from syncnorm.transports.base import LayerKey


class GlobalBatchMean:
    """Turns per-sample losses into a loss whose DDP average is the global-batch mean.

    Example::

        ddp = DistributedDataParallel(syncnorm.convert_sync_batchnorm(model))
        global_mean = syncnorm.GlobalBatchMean(ddp)
        for x, y in batches:                          # batch sizes may differ per worker
            losses = F.cross_entropy(ddp(x), y, reduction="none")
            global_mean(losses).backward()            # exact global-batch gradient
            print(global_mean.last_mean_loss)         # this worker's plain mean, for logs

    Args:
        module: the DDP-wrapped model (or the model itself when not using DDP; then
            gradients are not averaged by anyone and the scale ``W`` is 1).

    The returned value is ``W * sum(losses) / N``: this worker's share of the
    global mean, scaled by the world size ``W`` that DDP divides by.
    """

    def __init__(self, module: nn.Module) -> None:
        inner = module.module if isinstance(module, DistributedDataParallel) else module
        layers = [m for m in inner.modules() if isinstance(m, (SyncBatchNorm, BatchBranchNorm))]
        if not layers:
            raise ValueError(
                "GlobalBatchMean needs a model with syncnorm.SyncBatchNorm layers (or the synchronized "
                "norms of syncnorm.norms)"
            )
        self._layer = layers[0]
        self._ddp_world_size = (
            dist.get_world_size(module.process_group) if isinstance(module, DistributedDataParallel) else 1
        )
        self._key = LayerKey("<global batch size>", 1)
        self.global_batch_size: Tensor | None = None
        self.last_mean_loss: float = float("nan")

    def __call__(self, losses: Tensor) -> Tensor:
        """``losses``: one loss per sample of this worker's batch (may be empty)."""
        if losses.dim() != 1:
            raise ValueError(
                f"expected one loss per sample (a 1-D tensor), got shape {tuple(losses.shape)}; "
                "use reduction='none'"
            )
        local = torch.tensor([float(losses.shape[0])], dtype=torch.float64, device=losses.device)
        reducer = self._layer.active_reducer()
        total = local if reducer is None else reducer.sum_across_workers(local, self._key)
        self.global_batch_size = total[0]
        total_sum = losses.sum()
        self.last_mean_loss = float(total_sum.detach()) / max(losses.shape[0], 1)
        scale = self._ddp_world_size / total[0].clamp(min=1)
        return total_sum * scale.to(losses.dtype)
