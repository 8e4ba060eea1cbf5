"""The torch.distributed transport: one collective per layer call, Gloo or NCCL.

Which collective carries the statistics is chosen per backend from measurements
(see :data:`FASTEST_PRIMITIVE`): the all-gather sends each worker's raw moments,
merged on every worker with Chan's update; the all-reduce sends float64 power
sums (payload O(C) whatever the world size).  Both give the exact merged moments.
When every rank of a Gloo group runs on one host, the all-gather of CPU tensors
goes through shared memory instead of Gloo's sockets
(:mod:`syncnorm.transports.shared_memory`); Gloo still carries each layer's
first-call handshake.
"""

from __future__ import annotations

import datetime
import os
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from syncnorm.moments import Moments, from_power_sums, merge_moments, to_power_sums
from syncnorm.transports.base import (
    SIGNATURE_BITS,
    LayerKey,
    LayerMismatchError,
    StatsReducer,
    SynchronizationError,
)
from syncnorm.transports.shared_memory import SharedMemoryChannel, supported_here

Primitive = Literal["all_gather", "all_reduce", "shared_memory"]
_T = TypeVar("_T")

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
"""The collective used for each backend when ``primitive="auto"`` and the ranks do
not all share one host (on one host, Gloo groups use ``"shared_memory"``)."""

SHARED_MEMORY_ENV = "SYNCNORM_SHARED_MEMORY"
"""Set to ``0`` (on every rank) to keep ``primitive="auto"`` off shared memory."""

_DIRECTIONS = {"forward": 0, "backward": 1}

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
class _Header:
    """The first value of a payload: the layer's signature, and the direction
    (0 forward, 1 backward) above the signature's bits; also as a float64 tensor."""

    value: int

    def __post_init__(self) -> None:
        self.tensor = torch.tensor([float(self.value)], dtype=_PAYLOAD_DTYPE)


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
        primitive: ``"all_gather"``, ``"all_reduce"``, ``"shared_memory"``, or
            ``"auto"``.  ``"shared_memory"`` is an all-gather through a shared
            file in ``/dev/shm`` for Gloo groups whose ranks all run on one
            Linux x86-64 host (CPU tensors; other devices use Gloo's all_gather),
            and raises at the first call if they do not.  ``"auto"`` takes
            ``"shared_memory"`` where it works, decided together by all ranks at
            the first call (:data:`SHARED_MEMORY_ENV` ``=0`` opts out), and
            :data:`FASTEST_PRIMITIVE` for the group's backend otherwise.
        timeout_s: how long one collective may wait for its peers before every
            waiting worker raises :class:`SynchronizationError` naming the layer and
            call (default: ``SYNCNORM_TIMEOUT_S``, else 300 s).  On NCCL the
            host never waits for the device, so there the process group's own
            timeout (``init_process_group(timeout=...)``) bounds the wait.

    Every payload carries the layer's signature and direction.  The first call for each layer
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
        if primitive not in ("auto", "all_gather", "all_reduce", "shared_memory"):
            raise ValueError(
                f"primitive must be 'auto', 'all_gather', 'all_reduce' or 'shared_memory', got {primitive!r}"
            )
        self._group = weakref.ref(group) if group is not None else None
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        backend = str(dist.get_backend(group)).lower()
        if primitive == "shared_memory":
            if backend != "gloo":
                raise ValueError(f"primitive='shared_memory' needs a Gloo group, this one is {backend}")
            why = supported_here()
            if why is not None:
                raise ValueError(f"primitive='shared_memory' is not available: {why}")
        # "shared_memory" under "auto" is provisional until the first call, where
        # all ranks check together that they can share memory.
        self._requires_shared_memory = primitive == "shared_memory"
        if primitive == "auto":
            primitive = "shared_memory" if backend == "gloo" else FASTEST_PRIMITIVE.get(backend, "all_reduce")
        self.primitive: Primitive = primitive
        self._channel: SharedMemoryChannel | None = None
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
        self._headers: dict[tuple[int, str], _Header] = {}

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
        if self.primitive != "all_reduce":
            rows = self._gather([local.count.reshape(1), local.mean, local.m2], layer, "forward")
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
        if self.primitive != "all_reduce":
            rows = self._gather([local], layer, "backward")
            return rows[:, 1:].sum(0).to(local.dtype)
        return self._all_reduce_signed(local.to(_PAYLOAD_DTYPE), layer, "backward").to(local.dtype)

    # -- collectives ----------------------------------------------------------

    def _gather(self, parts: list[Tensor], layer: LayerKey, direction: str) -> Tensor:
        """All-gather ``[header, *parts]`` (float64) from every rank: the rows, shape
        ``(W, 1 + sum of the parts' sizes)``, after checking every rank's header.

        The rows are valid until this reducer's next round (they may be shared memory)."""
        size = 1 + sum(p.numel() for p in parts)
        device = parts[0].device
        channel = self._channel
        if channel is not None and device.type == "cpu" and size <= channel.width:
            torch.cat([self._header(layer, direction).tensor, *parts], out=channel.row()[:size])
            rows = self._synchronized(lambda: channel.exchange(size, self.timeout_s), layer, direction)
        else:
            buffers = self._buffers(layer, direction, size, device)
            torch.cat(parts, out=buffers.body)
            out = buffers.gathered
            self._wait(
                lambda: all_gather_into(out, buffers.payload, self.group, async_op=True), layer, direction
            )
            rows = buffers.rows
        self._check(rows[:, 0], layer, direction, ranks_gathered=True)
        return rows

    def _header(self, layer: LayerKey, direction: str) -> _Header:
        """The first value of a layer's payloads in one direction (cached)."""
        key = (layer.instance, direction)
        header = self._headers.get(key)
        if header is None:
            header = self._headers[key] = _Header(
                layer.signature + (_DIRECTIONS[direction] << SIGNATURE_BITS)
            )
        return header

    def _buffers(self, layer: LayerKey, direction: str, size: int, device: torch.device) -> _RoundBuffers:
        """A layer's send and receive buffers for one direction, kept between calls
        (every call has the same size), with the header already in place."""
        key = (layer.instance, direction)
        buffers = self._round_buffers.get(key)
        if buffers is None or buffers.payload.numel() != size or buffers.payload.device != device:
            payload = torch.empty(size, dtype=_PAYLOAD_DTYPE, device=device)
            payload[:1] = self._header(layer, direction).tensor
            gathered = payload.new_empty(self.world_size * size)
            buffers = self._round_buffers[key] = _RoundBuffers(payload, gathered)
        return buffers

    def _wait(self, start: Callable[[], dist.Work | None], layer: LayerKey, direction: str) -> None:
        """Run one torch.distributed collective, waiting at most the timeout on the host."""

        def run() -> None:
            work = start()
            assert work is not None
            if self._host_waits:
                work.wait(timeout=self._wait_limit)
            else:
                work.wait()

        self._synchronized(run, layer, direction)

    def _synchronized(self, run: Callable[[], _T], layer: LayerKey, direction: str) -> _T:
        """``run()``, with a dead, hung or missing peer turned into a SynchronizationError."""
        try:
            return run()
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
        if self.primitive == "shared_memory":
            self._reserve_channel(2 + 2 * layer.num_features)

    def _reserve_channel(self, width: int) -> None:
        """Open the shared-memory channel at the first handshake (collective), or grow
        its rows for a wider layer (if they cannot grow, that layer's rounds use Gloo's
        all_gather); under ``"auto"`` fall back to all_gather if the ranks cannot share
        memory."""
        if self._channel is not None:
            self._channel.reserve(width, self.group)
            return
        opted_out = not self._requires_shared_memory and os.environ.get(SHARED_MEMORY_ENV) == "0"
        channel, why = SharedMemoryChannel.open(
            self.group, width, refuse=f"{SHARED_MEMORY_ENV}=0" if opted_out else None
        )
        if channel is None and self._requires_shared_memory:
            raise RuntimeError(f"primitive='shared_memory' cannot be used by this group: {why}")
        self._channel = channel
        if channel is None:
            self.primitive = "all_gather"

    def _describe_header(self, header: int) -> str:
        direction = "backward" if header >> SIGNATURE_BITS else "forward"
        return f"the {direction} synchronization of {self._label(header & ((1 << SIGNATURE_BITS) - 1))}"

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
            expected = self._header(layer, direction).value
            if all(h == expected for h in values):
                return
            detail = "; ".join(
                f"rank {r} was in {self._describe_header(int(h))}"
                for r, h in enumerate(values)
                if h != expected
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
