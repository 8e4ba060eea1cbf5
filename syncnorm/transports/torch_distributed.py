"""The torch.distributed transport: one collective per layer call, Gloo or NCCL.

Which collective carries the statistics is chosen per backend from measurements
(see :data:`FASTEST_PRIMITIVE`): the all-gather sends each worker's raw moments,
merged on every worker with Chan's update; the all-reduce sends float64 power
sums (payload O(C) whatever the world size).  Both give the exact merged moments.
"""

from __future__ import annotations

import datetime
import os
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from syncnorm.moments import Moments, from_power_sums, merge_moments, to_power_sums
from syncnorm.transports.base import LayerKey, LayerMismatchError, StatsReducer, SynchronizationError

Primitive = Literal["all_gather", "all_reduce"]

FASTEST_PRIMITIVE: dict[str, Primitive] = {
    # Gloo, 2 ranks on one 2-core host (torch 2.13, 2026-11): median latency for
    # 129 / 513 / 2049 floats was 0.32 / 0.35 / 0.37 ms with all_gather against
    # 0.44 / 0.54 / 0.50 ms with all_reduce; with 4 ranks 3.5-3.9 ms against
    # 4.7-5.1 ms.  Gloo's all-reduce runs more rounds than its all-gather, and at
    # these sizes latency, not bytes, is the cost.
    "gloo": "all_gather",
    # NCCL's all-reduce is a single ring/tree pass and keeps the payload O(C)
    # however many ranks there are, which is what matters at GPU scale.
    "nccl": "all_reduce",
}
"""The collective used for each backend when ``primitive="auto"``."""

_PAYLOAD_DTYPE = torch.float64
"""Payloads travel in float64: counts stay exact beyond 2**24 values per channel,
and the all-reduce path's power sums keep ~1e-8 relative variance error at
|mean|/std = 1e4 (see syncnorm.moments)."""


DEFAULT_TIMEOUT_S = 300.0
"""How long a SyncBN collective may wait for its peers unless ``SYNCNORM_TIMEOUT_S``
says otherwise: long enough for a slow first step, far below Gloo's 30 minutes."""


def timeout_from_env() -> float:
    """``SYNCNORM_TIMEOUT_S`` in seconds, or :data:`DEFAULT_TIMEOUT_S`."""
    text = os.environ.get("SYNCNORM_TIMEOUT_S")
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"SYNCNORM_TIMEOUT_S must be a positive number of seconds, got {text!r}")
    return value


# torch 2.13 renamed all_gather_into_tensor to all_gather_single and deprecated the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_into(
    out: Tensor, tensor: Tensor, group: dist.ProcessGroup | None = None, async_op: bool = False
) -> dist.Work | None:
    """All-gather ``tensor`` from every rank into the flat ``out`` (rank-major)."""
    return _all_gather_single(out, tensor, group=group, async_op=async_op)


@dataclass
class _PendingCheck:
    """A signature check whose values are still being copied off an accelerator."""

    event: torch.cuda.Event
    host_values: Tensor
    layer: LayerKey
    direction: str
    ranks_gathered: bool


@dataclass
class _RoundBuffers:
    """One layer's all-gather buffers for one direction: the payload (signature
    first, then ``body``) and the gathered payloads, flat and as ``rows``."""

    payload: Tensor
    gathered: Tensor

    def __post_init__(self) -> None:
        self.body = self.payload[1:]
        self.rows = self.gathered.view(-1, self.payload.numel())


class TorchDistributedReducer(StatsReducer):
    """Synchronizes SyncBN statistics over a torch.distributed process group.

    Args:
        group: the process group (``None``: the default group).
        primitive: ``"all_gather"``, ``"all_reduce"``, or ``"auto"`` to take
            :data:`FASTEST_PRIMITIVE` for the group's backend.
        timeout_s: how long one collective may wait for its peers before every
            waiting worker raises :class:`SynchronizationError` naming the layer and
            call (default: ``SYNCNORM_TIMEOUT_S``, else 300 s).  On NCCL the
            host never waits for the device, so there the process group's own
            timeout (``init_process_group(timeout=...)``) bounds the wait.

    Every payload carries the layer's signature.  The first call for each layer
    also exchanges ``(signature, num_features)`` in a fixed-size round, so that
    workers with different channel counts for a layer get a
    :class:`LayerMismatchError` naming it instead of a mismatched-size
    collective (which Gloo answers by aborting the process).  On CPU the
    signature check is immediate; on accelerators it is read back asynchronously
    and raised at a later call, so that no call waits for the device.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        primitive: Primitive | Literal["auto"] = "auto",
        timeout_s: float | None = None,
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchDistributedReducer needs an initialized process group: call "
                "torch.distributed.init_process_group first (torchrun sets up the environment for it)."
            )
        if primitive not in ("auto", "all_gather", "all_reduce"):
            raise ValueError(f"primitive must be 'auto', 'all_gather' or 'all_reduce', got {primitive!r}")
        self._group = weakref.ref(group) if group is not None else None
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        backend = str(dist.get_backend(group)).lower()
        self.primitive: Primitive = (
            FASTEST_PRIMITIVE.get(backend, "all_reduce") if primitive == "auto" else primitive
        )
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.timeout_s = timeout_s if timeout_s is not None else timeout_from_env()
        self._wait_limit = datetime.timedelta(seconds=self.timeout_s)
        self._host_waits = backend != "nccl"
        self._verified: set[int] = set()
        self._names: dict[int, str] = {}
        self._pending: list[_PendingCheck] = []
        self._calls: Counter[tuple[int, str]] = Counter()
        self._round_buffers: dict[tuple[int, str], _RoundBuffers] = {}

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The process group (``None``: the default one); held weakly, like its cache entry."""
        if self._group is None:
            return None
        group = self._group()
        if group is None:
            raise RuntimeError("this reducer's process group was destroyed")
        return group

    def __deepcopy__(self, memo: dict) -> TorchDistributedReducer:
        # A handle on a process group: copies of a model (EMA, eval copies) share it.
        return self

    # -- StatsReducer ---------------------------------------------------------

    def merge_moments(self, local: Moments, layer: LayerKey) -> Moments:
        self._start_round(layer, local.mean.device, "forward")
        c = layer.num_features
        if self.primitive == "all_gather":
            buffers = self._buffers(layer, "forward", 2 + 2 * c, local.mean.device)
            torch.cat([local.count.reshape(1), local.mean, local.m2], out=buffers.body)
            rows = self._all_gather(buffers, layer, "forward")
            return merge_moments(rows[:, 1], rows[:, 2 : 2 + c], rows[:, 2 + c :])
        n, s1, s2 = to_power_sums(
            Moments(
                local.count.to(_PAYLOAD_DTYPE),
                local.mean.to(_PAYLOAD_DTYPE),
                local.m2.to(_PAYLOAD_DTYPE),
            )
        )
        total = self._all_reduce_signed(torch.cat([n.reshape(1), s1, s2]), layer, "forward")
        return from_power_sums(total[0], total[1 : 1 + c], total[1 + c :])

    def sum_across_workers(self, local: Tensor, layer: LayerKey) -> Tensor:
        self._start_round(layer, local.device, "backward")
        if self.primitive == "all_gather":
            buffers = self._buffers(layer, "backward", 1 + local.numel(), local.device)
            buffers.body.copy_(local)
            rows = self._all_gather(buffers, layer, "backward")
            return rows[:, 1:].sum(0).to(local.dtype)
        return self._all_reduce_signed(local.to(_PAYLOAD_DTYPE), layer, "backward").to(local.dtype)

    # -- collectives ----------------------------------------------------------

    def _buffers(self, layer: LayerKey, direction: str, size: int, device: torch.device) -> _RoundBuffers:
        """A layer's send and receive buffers for one direction, kept between calls
        (every call has the same size), with the signature already in place."""
        key = (layer.instance, direction)
        buffers = self._round_buffers.get(key)
        if buffers is None or buffers.payload.numel() != size or buffers.payload.device != device:
            payload = torch.empty(size, dtype=_PAYLOAD_DTYPE, device=device)
            payload[0] = float(layer.signature)
            gathered = payload.new_empty(self.world_size * size)
            buffers = self._round_buffers[key] = _RoundBuffers(payload, gathered)
        return buffers

    def _all_gather(self, buffers: _RoundBuffers, layer: LayerKey, direction: str) -> Tensor:
        """All-gather ``buffers.payload``; the rows, after checking every rank's signature."""
        out = buffers.gathered
        self._wait(lambda: all_gather_into(out, buffers.payload, self.group, async_op=True), layer, direction)
        self._check(buffers.rows[:, 0], layer, direction, ranks_gathered=True)
        return buffers.rows

    def _wait(self, start: Callable[[], dist.Work | None], layer: LayerKey, direction: str) -> None:
        """Run one collective; a dead, hung or missing peer becomes a SynchronizationError."""
        try:
            work = start()
            assert work is not None
            if self._host_waits:
                work.wait(timeout=self._wait_limit)
            else:
                work.wait()
        except RuntimeError as error:
            call = self._calls[(layer.instance, direction)]
            raise SynchronizationError(
                f"{layer.describe()}: {direction} synchronization (call {call} of this layer) failed on "
                f"rank {self.rank} ({str(error).strip()}). A peer died, hung, or stopped calling this "
                f"layer; waits are bounded by {self.timeout_s:g} s (SYNCNORM_TIMEOUT_S). For workers that "
                "run out of data early, see syncnorm.SyncBatchNormJoin."
            ) from error

    def _all_reduce_signed(self, body: Tensor, layer: LayerKey, direction: str) -> Tensor:
        # (sig, sig^2) summed over workers equals (W*s, W*s^2) only if every
        # worker sent s: the variance of the signatures is then zero.
        sig = float(layer.signature)
        head = torch.tensor([sig, sig * sig], dtype=_PAYLOAD_DTYPE, device=body.device)
        total = torch.cat([head, body])
        self._wait(lambda: dist.all_reduce(total, group=self.group, async_op=True), layer, direction)
        deviation = total[:2] - self.world_size * head
        self._check(deviation, layer, direction, ranks_gathered=False)
        return total[2:]

    # -- layer checks ---------------------------------------------------------

    def _start_round(self, layer: LayerKey, device: torch.device, direction: str) -> None:
        self._drain_pending(block=False)
        self._calls[(layer.instance, direction)] += 1
        if layer.instance in self._verified:
            return
        self._names[layer.signature] = layer.describe()
        mine = torch.tensor(
            [float(layer.signature), float(layer.num_features)], dtype=_PAYLOAD_DTYPE, device=device
        )
        gathered = mine.new_empty(self.world_size * mine.numel())
        self._wait(lambda: all_gather_into(gathered, mine, self.group, async_op=True), layer, "handshake")
        rows = gathered.view(self.world_size, -1).cpu()
        if not bool((rows == mine.cpu()).all()):
            others = "; ".join(
                f"rank {r}: num_features={int(c)}"
                + ("" if int(s) == layer.signature else f", {self._label(int(s))}")
                for r, (s, c) in enumerate(rows.tolist())
            )
            raise LayerMismatchError(
                f"{layer.describe()}: workers disagree on this layer at its first synchronization "
                f"({others}). Every worker must build the same model and call its SyncBN layers "
                "in the same order with the same channel counts."
            )
        self._verified.add(layer.instance)

    def _label(self, signature: int) -> str:
        """What this process knows of the layer with ``signature``."""
        return self._names.get(signature, f"a layer this rank has not run (signature {signature})")

    def _check(self, observed: Tensor, layer: LayerKey, direction: str, ranks_gathered: bool) -> None:
        if observed.device.type != "cuda":
            self._raise_if_mismatch(observed.cpu(), layer, direction, ranks_gathered)
            return
        host = torch.empty(observed.shape, dtype=observed.dtype, pin_memory=True)
        host.copy_(observed, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append(_PendingCheck(event, host, layer, direction, ranks_gathered))

    def _drain_pending(self, block: bool) -> None:
        while self._pending and (block or self._pending[0].event.query()):
            check = self._pending.pop(0)
            check.event.synchronize()
            self._raise_if_mismatch(check.host_values, check.layer, check.direction, check.ranks_gathered)

    def flush_checks(self) -> None:
        """Wait for and raise any signature mismatch still in flight on an accelerator."""
        self._drain_pending(block=True)

    def _raise_if_mismatch(
        self, observed: Tensor, layer: LayerKey, direction: str, ranks_gathered: bool
    ) -> None:
        values = observed.tolist()  # one read for a few values: cheaper than comparing on the tensor
        if ranks_gathered:
            if all(s == layer.signature for s in values):
                return
            detail = "; ".join(
                f"rank {r} was in {self._label(int(s))}"
                for r, s in enumerate(values)
                if int(s) != layer.signature
            )
        else:
            if not any(values):
                return
            detail = "at least one other rank was in a different layer"
        raise LayerMismatchError(
            f"{layer.describe()}: {direction} synchronization mismatch on rank {self.rank}: {detail}. "
            "Every worker must call its SyncBN layers in the same order (same model, same branches)."
        )


_reducers: weakref.WeakKeyDictionary[dist.ProcessGroup, TorchDistributedReducer] = weakref.WeakKeyDictionary()
"""The default reducer of each live group.  Weak: a group that
``destroy_process_group`` released is not kept alive here until the interpreter
exits, where its late destruction could abort the process (seen with Gloo)."""


def default_reducer(group: dist.ProcessGroup | None) -> TorchDistributedReducer | None:
    """The reducer SyncBatchNorm uses when given none: ``None`` (plain local batch
    norm) unless torch.distributed is initialized and ``group`` has several ranks."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    resolved = group if group is not None else dist.group.WORLD
    cached = _reducers.get(resolved)
    if cached is not None:
        return cached
    if dist.get_world_size(group) == 1:
        return None
    reducer = _reducers[resolved] = TorchDistributedReducer(group)
    return reducer


def consecutive_groups(group_size: int) -> dist.ProcessGroup:
    """Split the default group into blocks of ``group_size`` consecutive ranks
    (e.g. one block per node) and return the block holding this rank.

    Every rank must call it (process-group creation is collective).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("consecutive_groups needs an initialized default process group")
    world = dist.get_world_size()
    if group_size < 1 or world % group_size:
        raise ValueError(f"group_size must be a positive divisor of the world size {world}, got {group_size}")
    rank = dist.get_rank()
    mine = None
    for start in range(0, world, group_size):
        group = dist.new_group(list(range(start, start + group_size)))
        if start <= rank < start + group_size:
            mine = group
    assert mine is not None
    return mine
