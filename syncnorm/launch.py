"""Run a function on N local processes joined in a Gloo group on loopback.

For demos and benchmarks on one machine; real jobs use ``torchrun`` or Ray.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, threads: int, results: Any, args: tuple
) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        # Gloo waits 30 minutes by default; a local run that stalls is a bug.
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        # Plain pickle copies tensors into bytes: torch's queue pickling would share
        # memory that vanishes when this process exits before the parent reads it.
        results.put(pickle.dumps((rank, fn(rank, world_size, *args))))
    finally:
        dist.destroy_process_group()


def run_local_group(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600, threads: int = 1
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes in one
    Gloo group and return their results by rank.  ``fn`` must be importable (module level).

    Raises the first worker's exception, or ``TimeoutError`` after ``timeout_s``.
    """
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on loopback
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_loopback_port()
    context = mp.start_processes(
        _entry, args=(fn, world_size, port, threads, results, args), nprocs=world_size, join=False,
        start_method="spawn",
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    by_rank: dict[int, Any] = {}
    try:
        # Read while the workers run: a worker cannot exit before its result is read.
        while len(by_rank) < world_size:
            try:
                rank, value = pickle.loads(results.get(timeout=1.0))
                by_rank[rank] = value
                continue
            except queue.Empty:
                pass
            context.join(timeout=0)  # raises the first worker's exception
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{fn.__name__} did not finish on {world_size} workers within {timeout_s} s"
                )
        context.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    return [by_rank[r] for r in range(world_size)]
