"""An all-gather through shared memory, for process groups whose ranks share one host.

When every rank of a Gloo group runs on the same machine, a SyncBN round does
not need sockets: each rank writes its payload into a shared file in
``/dev/shm`` and reads its peers' rows there.  On a 2-core machine a bare round
of 514 float64 values between 2 ranks took 0.018 ms, against 0.46 ms for Gloo's
all_gather over loopback, and it avoids the thread hand-offs that slow each Gloo
collective that follows a layer's computation (see the README's benchmark).

Layout of the region, one per channel and shared by all layers::

    W lines of 64 bytes    line r holds, as int64 at its start, the last round rank r published
    64 bytes               a nonce written by its creator (checked once by every rank)
    2 slots x W rows       float64 rows of ``width`` values; round k uses slot k % 2

Round ``k`` (numbered 1, 2, ... in the order every rank calls them)::

    write my payload into my row of slot k % 2
    publish: line[rank] = k
    wait until line[j] >= k for every rank j
    read the W rows of slot k % 2            # the caller copies out what it needs

A rank writes slot ``k % 2`` again only in round ``k + 2``, which it enters after
seeing every peer publish round ``k + 1``; a peer publishes ``k + 1`` only after
it has read round ``k``.  Two slots are therefore enough, and a round needs no
second barrier.  The protocol relies on stores becoming visible in program order
and loads being performed in program order, which x86-64 guarantees (TSO) and
weaker memory models (ARM, POWER) do not; elsewhere the channel is not offered.

Waiting spins briefly, then yields the CPU (peers on an oversubscribed machine
get to run), then naps.  A rank that waits also checks, about every
:data:`LIVENESS_EVERY_S`, that the peers it waits for are still alive (through
``/proc``, when all ranks share a PID namespace), so a dead peer is reported at
once rather than at the timeout.
"""

from __future__ import annotations

import mmap
import os
import platform
import secrets
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

SHM_DIR = "/dev/shm"
"""Where regions are created (a tmpfs on Linux: memory, never disk)."""

_LINE = 64  # one cache line per rank's round counter
_SPINS = 200  # ~0.1-0.2 ms of polling before yielding
YIELD_S = 5e-3
"""How long a waiting rank yields the CPU in a loop before it starts to nap."""
_NAP_S = 2e-4
LIVENESS_EVERY_S = 0.05
"""How often a waiting rank checks that the peers it waits for are alive."""


class PeerLost(RuntimeError):
    """A round did not complete: a peer exited, or did not publish within the timeout."""


def supported_here() -> str | None:
    """Why this process cannot use a shared-memory channel, or ``None`` if it can."""
    if platform.system() != "Linux":
        return f"shared-memory rounds need Linux (this is {platform.system()})"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"shared-memory rounds rely on x86-64's store ordering (this CPU is {platform.machine()})"
    if not (os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK | os.X_OK)):
        return f"{SHM_DIR} is missing or not writable"
    if _stat_fields("self") is None:
        return "/proc is not mounted (peers' liveness is read there)"
    return None


@dataclass(frozen=True)
class _Process:
    """What a rank tells its peers about itself, so that they can see it die."""

    pid: int
    start_time: str  # /proc/<pid>/stat field 22: tells a reused PID apart
    pid_namespace: int


def _stat_fields(pid: int | str) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), or ``None`` if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _this_process() -> _Process:
    fields = _stat_fields("self")
    assert fields is not None
    return _Process(os.getpid(), fields[19], os.stat("/proc/self/ns/pid").st_ino)


def _is_alive(process: _Process) -> bool:
    fields = _stat_fields(process.pid)
    return fields is not None and fields[19] == process.start_time and fields[0] not in ("Z", "X", "x")


class _Region:
    """One mapped region: the round counters and the two slots of ``width``-value rows."""

    def __init__(self, path: str, world_size: int, width: int) -> None:
        self.width = width
        fd = os.open(path, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, region_bytes(world_size, width))
        finally:
            os.close(fd)
        self.rounds = memoryview(self.map).cast("q")  # line r's counter at index r * _LINE // 8
        data_at = (world_size + 1) * _LINE
        data = torch.frombuffer(self.map, dtype=torch.float64, offset=data_at, count=2 * world_size * width)
        self.slots = data.view(2, world_size, width)

    def nonce(self, world_size: int) -> int:
        return int.from_bytes(self.map[world_size * _LINE : world_size * _LINE + 8], "little")


def region_bytes(world_size: int, width: int) -> int:
    return (world_size + 1) * _LINE + 2 * world_size * width * 8


class SharedMemoryChannel:
    """All-gathers fixed-width float64 rows among the ranks of one group on one host.

    Create it with :meth:`open` (collective over ``group``).  Each round is
    :meth:`row` (this rank's row of the coming round, to fill in place) followed
    by :meth:`exchange`; every rank must run the same rounds in the same order,
    as SyncBN rounds are.  The region's file is unlinked as soon as every rank
    has mapped it, so nothing is left in ``/dev/shm`` when the processes end.
    """

    def __init__(self, rank: int, world_size: int, peers: list[_Process], region: _Region) -> None:
        self.rank = rank
        self.world_size = world_size
        self._peers = peers
        same_namespace = len({p.pid_namespace for p in peers}) == 1
        self._watch_peers = same_namespace  # PIDs of another namespace mean nothing here
        self._use(region)

    @classmethod
    def open(
        cls, group: dist.ProcessGroup | None, width: int, refuse: str | None = None
    ) -> tuple[SharedMemoryChannel | None, str]:
        """A channel over ``group`` with rows of ``width`` values, or ``(None, why not)``.

        Collective: every rank of ``group`` must call it, and all get the same answer:
        a channel only if every rank supports one (:func:`supported_here`), none
        ``refuse``-s (the reason given), and every rank can map a file that rank 0
        creates in ``/dev/shm``.
        """
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        local = refuse or supported_here()
        facts: list[object] = [None] * world_size
        dist.all_gather_object(facts, (local, None if local else _this_process()), group=group)
        problems = [f"rank {r}: {why}" for r, (why, _) in enumerate(facts) if why]  # type: ignore[misc]
        if problems:
            return None, "; ".join(problems)
        peers = [process for _, process in facts]  # type: ignore[misc]
        region = _create_region(group, rank, world_size, width)
        if region is None:
            return None, f"not every rank could map a file created in {SHM_DIR} (ranks on several hosts?)"
        return cls(rank, world_size, peers, region), ""

    def _use(self, region: _Region) -> None:
        self._region = region
        self._round = 0
        self._lines = [r * _LINE // 8 for r in range(self.world_size)]

    @property
    def width(self) -> int:
        return self._region.width

    def reserve(self, width: int, group: dist.ProcessGroup | None) -> bool:
        """Try to make rows hold at least ``width`` values; whether they do.

        Collective over ``group`` (the channel's) when it grows: every rank must call
        it with the same ``width`` at the same point (between rounds), and all get the
        same answer.  If the larger region cannot be made (e.g. ``/dev/shm`` is full),
        the channel keeps its rows and rounds wider than them must go elsewhere.  The
        channel does not hold the group, so that it never keeps a destroyed group alive.
        """
        if width <= self.width:
            return True
        region = _create_region(group, self.rank, self.world_size, max(width, 2 * self.width))
        if region is not None:
            self._use(region)
        return region is not None

    def row(self) -> Tensor:
        """This rank's row (``width`` values) in the slot of the next round."""
        return self._region.slots[(self._round + 1) & 1, self.rank]

    def exchange(self, size: int, timeout_s: float) -> Tensor:
        """Publish this rank's row, wait for every peer's, and return the first ``size``
        values of every rank's row, shape ``(W, size)``.

        The result is a view of shared memory, valid until this rank's next round.
        Raises :class:`PeerLost` if a peer exits or ``timeout_s`` passes first.
        """
        self._round += 1
        k = self._round
        region = self._region
        region.rounds[self._lines[self.rank]] = k
        rounds, lines = region.rounds, self._lines
        for _ in range(_SPINS):
            if min(rounds[i] for i in lines) >= k:
                return region.slots[k & 1, :, :size]
        self._wait_long(k, timeout_s)
        return region.slots[k & 1, :, :size]

    def _wait_long(self, k: int, timeout_s: float) -> None:
        rounds, lines = self._region.rounds, self._lines
        start = time.monotonic()
        next_check = start + LIVENESS_EVERY_S
        while min(rounds[i] for i in lines) < k:
            now = time.monotonic()
            if now < start + YIELD_S:
                os.sched_yield()
                continue
            time.sleep(_NAP_S)
            if now < next_check:
                continue
            next_check = now + LIVENESS_EVERY_S
            missing = [r for r, i in enumerate(lines) if rounds[i] < k]
            if self._watch_peers:
                dead = [r for r in missing if not _is_alive(self._peers[r])]
                if dead and min(rounds[i] for i in lines) < k:
                    raise PeerLost(f"rank(s) {_ranks(dead)} exited (shared-memory round {k})")
            if now - start > timeout_s:
                raise PeerLost(
                    f"rank(s) {_ranks(missing)} did not reach shared-memory round {k} within {timeout_s:g} s"
                )


def _ranks(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)


def _create_region(group: dist.ProcessGroup | None, rank: int, world_size: int, width: int) -> _Region | None:
    """Rank 0 creates the file, every rank maps it and checks its nonce, rank 0
    unlinks it; ``None`` on every rank unless every rank succeeded.  Collective."""
    offer: list[object] = [None, None]
    path = None
    try:
        if rank == 0:
            try:
                path = _create_file(
                    region_bytes(world_size, width), world_size * _LINE, nonce := secrets.randbits(63)
                )
                offer = [path, nonce]
            except OSError:
                pass  # offer stays [None, None]: no region, on every rank
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast_object_list(offer, src=src, group=group)
        region: _Region | None = None
        if offer[0] is not None:
            try:
                region = _Region(str(offer[0]), world_size, width)
                if region.nonce(world_size) != offer[1]:
                    region = None
            except OSError:
                region = None
        mapped = torch.tensor([0 if region is None else 1])
        dist.all_reduce(mapped, op=dist.ReduceOp.MIN, group=group)  # everyone has mapped it (or failed)
        return region if bool(mapped.item()) else None
    finally:
        if path is not None:
            os.unlink(path)


def _create_file(size: int, nonce_at: int, nonce: int) -> str:
    """A new file of ``size`` bytes in :data:`SHM_DIR` with ``nonce`` at ``nonce_at``.

    Its memory is allocated now, so that a full tmpfs fails here with ``OSError``
    rather than later with SIGBUS when a page of the mapping is first written."""
    fd, path = tempfile.mkstemp(prefix="syncnorm-", dir=SHM_DIR)
    try:
        os.posix_fallocate(fd, 0, size)
        os.pwrite(fd, nonce.to_bytes(8, "little"), nonce_at)
    except OSError:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return path
