"""Uneven iteration counts: SyncBN under ``torch.distributed.algorithms.Join``.

A worker that runs out of data leaves the training loop while others go on;
every SyncBN collective of their further steps would then wait forever for it.
Under :class:`~torch.distributed.algorithms.Join`, :class:`SyncBatchNormJoin`
makes the finished worker shadow each of those collectives with an empty
contribution, so the statistics of the extra steps are exactly those of the
workers that still have data, and its running buffers follow theirs.

Usage (the order of the joinables matters)::

    ddp = syncnorm.join_ready_ddp(model)             # DDP without per-step buffer broadcast
    global_mean = syncnorm.GlobalBatchMean(ddp)    # optional: exact uneven-batch gradients
    sync_join = syncnorm.SyncBatchNormJoin(ddp)
    with Join([sync_join, ddp]):
        for x, y in my_batches:                     # different counts per worker
            global_mean(F.cross_entropy(ddp(x), y, reduction="none")).backward()
            ...

How it works: SyncBN layers move to a process group of their own (created here;
every worker must construct this object at the same point), so their rounds
never interleave with DDP's.  During each real step the layer calls are
recorded; a joined worker replays the last step's sequence, forward rounds
through the layers themselves on an empty batch (which also updates their
running buffers), backward rounds with zero sums.  Steps must call the same
SyncBN layers in the same order, as SPMD training does.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.join import Join, Joinable, JoinHook
from torch.nn.parallel import DistributedDataParallel

from syncnorm.batchnorm import SyncBatchNorm
from syncnorm.moments import Moments
from syncnorm.norms.base import BatchBranchNorm
from syncnorm.transports.base import LayerKey
from syncnorm.transports.torch_distributed import TorchDistributedReducer


@dataclass(frozen=True)
class _Round:
    layer: LayerKey
    direction: str  # "forward": merge_moments, "sum": sum_across_workers
    dtype: torch.dtype
    device: torch.device
    length: int = 0


class _RecordingReducer(TorchDistributedReducer):
    """A torch.distributed reducer that remembers the rounds of the current step."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__(group)
        self.rounds: list[_Round] = []
        self.recording = True

    def merge_moments(self, local: Moments, layer: LayerKey) -> Moments:
        if self.recording:
            self.rounds.append(_Round(layer, "forward", local.mean.dtype, local.mean.device))
        return super().merge_moments(local, layer)

    def sum_across_workers(self, local: Tensor, layer: LayerKey) -> Tensor:
        if self.recording:
            self.rounds.append(_Round(layer, "sum", local.dtype, local.device, local.numel()))
        return super().sum_across_workers(local, layer)


class SyncBatchNormJoin(Joinable):
    """Lets SyncBN workers finish with different numbers of steps; see the module docstring.

    Args:
        module: the training module: a ``DistributedDataParallel`` that does not
            broadcast buffers every step (see :func:`join_ready_ddp`: SyncBN
            buffers are identical on all workers already, and DDP's broadcast
            would wait on a worker that is busy shadowing SyncBN), or a plain
            module whose forward runs once per step.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("SyncBatchNormJoin needs an initialized default process group")
        if isinstance(module, DistributedDataParallel) and _syncs_buffers_every_step(module):
            raise ValueError(
                "SyncBatchNormJoin needs a DistributedDataParallel that does not broadcast buffers every "
                "step (build it with syncnorm.join_ready_ddp(model), or pass forward_sync_buffers=False, "
                "broadcast_buffers=False before torch 2.13): SyncBN running buffers are identical on every "
                "worker, and DDP's per-step buffer broadcast would deadlock with a joined worker"
            )
        self.module = module
        inner = module.module if isinstance(module, DistributedDataParallel) else module
        others = [m.layer_key.describe() for m in inner.modules() if isinstance(m, BatchBranchNorm)]
        if others:
            raise ValueError(
                f"SyncBatchNormJoin shadows SyncBatchNorm rounds only, and the module also has {others[0]}"
                f"{f' and {len(others) - 1} more' if len(others) > 1 else ''} from syncnorm.norms, whose "
                "rounds a joined worker would miss; give every worker the same number of steps instead"
            )
        self.layers = {m.layer_key.instance: m for m in inner.modules() if isinstance(m, SyncBatchNorm)}
        if not self.layers:
            raise ValueError("the module has no syncnorm.SyncBatchNorm layers to join")
        for layer in self.layers.values():
            if layer.reducer is not None or layer.process_group is not None:
                raise ValueError(
                    f"{layer.layer_key.describe()} has its own reducer or process group; "
                    "SyncBatchNormJoin supports layers synchronizing over the whole default group"
                )
        self._group = dist.group.WORLD
        self._reducer = _RecordingReducer(dist.new_group())
        for layer in self.layers.values():
            layer.reducer = self._reducer
        # prepend: the join notification must be this worker's first collective of the step
        module.register_forward_pre_hook(self._start_step, prepend=True)

    def _start_step(self, _module: nn.Module, _args: Any) -> None:
        self._check_first()
        Join.notify_join_context(self)
        self._reducer.rounds = []

    def _check_first(self) -> None:
        if self._join_config.enable and not self._join_config.is_first_joinable:
            raise ValueError(
                "SyncBatchNormJoin must come first in Join([...]), before DistributedDataParallel: "
                "a joined worker has to shadow the SyncBN rounds before DDP's gradient rounds"
            )

    def join_hook(self, **kwargs: Any) -> JoinHook:
        return _ShadowSyncBatchNorm(self)

    @property
    def join_device(self) -> torch.device:
        return torch.device("cpu") if dist.get_backend() == "gloo" else torch.device("cuda")

    @property
    def join_process_group(self) -> Any:
        return self._group

    def shadow_step(self) -> None:
        """Take part in one step of the other workers with an empty batch."""
        self._check_first()
        rounds = self._reducer.rounds
        if not rounds:
            raise RuntimeError(
                "this worker joined before running any step, so it cannot know which SyncBN rounds "
                "to shadow; give every worker at least one batch"
            )
        self._reducer.recording = False
        try:
            for r in rounds:
                if r.direction == "forward":
                    layer = self.layers[r.layer.instance]
                    shape = (0, layer.num_features, *([1] * ((layer.last_input_dim or 2) - 2)))
                    was_training = layer.training
                    layer.train()
                    with torch.no_grad():
                        layer(torch.empty(shape, dtype=r.dtype, device=r.device))
                    layer.train(was_training)
                else:  # a backward round, or GlobalBatchMean's batch size: contribute zeros
                    zeros = torch.zeros(r.length, dtype=r.dtype, device=r.device)
                    self._reducer.sum_across_workers(zeros, r.layer)
        finally:
            self._reducer.recording = True


def _syncs_buffers_every_step(ddp: DistributedDataParallel) -> bool:
    return bool(getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", True)))


def join_ready_ddp(module: nn.Module, **kwargs: Any) -> DistributedDataParallel:
    """``DistributedDataParallel(module, **kwargs)`` without the per-step buffer
    broadcast, as :class:`SyncBatchNormJoin` needs (buffers still sync at start)."""
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        kwargs.setdefault("forward_sync_buffers", False)  # torch >= 2.13
    else:
        kwargs.setdefault("broadcast_buffers", False)
    return DistributedDataParallel(module, **kwargs)


class _ShadowSyncBatchNorm(JoinHook):
    def __init__(self, join: SyncBatchNormJoin) -> None:
        self.join = join

    def main_hook(self) -> None:
        self.join.shadow_step()
