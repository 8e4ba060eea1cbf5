"""Precise BN: running statistics recomputed as exact population statistics.

Running buffers are an exponential average of batch statistics taken while the
weights were still moving, so they lag the final model (Wu & Johnson, 2021,
"Rethinking 'Batch' in BatchNorm", call the fix "precise BN").  fvcore's
``update_bn_stats`` recomputes them, but per process and as an equal-weight
average of batch moments.  Here the population is every value each layer sees
over ``num_batches`` training-mode forward passes on *every* worker: SyncBN
already merges each batch over the workers, and the batches are merged with
the same exact, count-weighted update (Chan et al.).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from syncnorm.batchnorm import SyncBatchNorm
from syncnorm.moments import Moments, merge_into


class _PopulationMoments:
    """Accumulates a layer's merged batch moments over batches."""

    def __init__(self) -> None:
        self.total: Moments | None = None

    def __call__(self, local: Moments, batch: Moments) -> None:
        if self.total is None:  # a copy: merge_into overwrites it
            self.total = Moments(*(t.double().clone() for t in (batch.count, batch.mean, batch.m2)))
        else:
            merge_into(self.total, Moments(batch.count.double(), batch.mean.double(), batch.m2.double()))


def _first_tensor(batch: Any) -> Tensor:
    return batch if isinstance(batch, Tensor) else batch[0]


@torch.no_grad()
def precise_bn(model: nn.Module, batches: Iterable[Any], num_batches: int = 200) -> int:
    """Set every SyncBatchNorm's running mean and variance to the exact statistics
    of the values it sees over ``num_batches`` batches from all workers.

    Args:
        model: a model with :class:`SyncBatchNorm` layers (unwrap DDP first:
            ``ddp.module``).  Its weights and training flag are left as they were.
        batches: this worker's batches; each is the model's input, or a tuple or
            list whose first element is.  Workers may run out at different
            points: a worker without more data joins the remaining rounds with
            an empty batch, so every worker's data counts.
        num_batches: how many batches to take at most from each worker.

    Returns:
        The number of batches this worker contributed.

    The variance stored is the unbiased population variance (what torch's
    running_var holds).  ``num_batches_tracked`` is left unchanged.
    """
    layers = [m for m in model.modules() if isinstance(m, SyncBatchNorm) and m.track_running_stats]
    if not layers:
        raise ValueError("precise_bn found no SyncBatchNorm layers that track running statistics")
    if num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}")
    observers = [_PopulationMoments() for _ in layers]
    tracked = [m.num_batches_tracked.clone() for m in layers]
    was_training = model.training
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    model.train()
    for layer, observer in zip(layers, observers, strict=True):
        layer.moment_observers.append(observer)
    used = 0
    example: Tensor | None = None
    try:
        for batch in _until_everyone_is_done(islice(batches, num_batches), distributed):
            if batch is None:  # out of data while others are not: join with an empty batch
                if example is None:
                    raise RuntimeError("precise_bn: this worker had no batch at all to take part with")
                model(example[:0])
                continue
            example = _first_tensor(batch)
            model(example)
            used += 1
    finally:
        for layer, observer in zip(layers, observers, strict=True):
            layer.moment_observers.remove(observer)
        for layer, count in zip(
            (m for m in layers if m.num_batches_tracked is not None), tracked, strict=True
        ):
            layer.num_batches_tracked.copy_(count)
        model.train(was_training)
    for layer, observer in zip(layers, observers, strict=True):
        if observer.total is None:
            continue
        layer.running_mean.copy_(observer.total.mean.to(layer.running_mean.dtype))
        layer.running_var.copy_(observer.total.unbiased_var.to(layer.running_var.dtype))
    return used


def _until_everyone_is_done(batches: Iterable[Any], distributed: bool) -> Iterator[Any | None]:
    """This worker's batches, then ``None`` while any other worker still has some."""
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        if distributed:
            device = (
                torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
            )
            flag = torch.tensor([0.0 if batch is None else 1.0], device=device)
            dist.all_reduce(flag)  # one value per batch: cheap next to the forward pass
            if flag.item() == 0:
                return
        elif batch is None:
            return
        yield batch
