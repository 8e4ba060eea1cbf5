"""A pool of worker processes joined in a real Gloo group on loopback.

Like PyTorch's ``MultiProcessTestCase``, every rank runs the same function; unlike
it, the processes (and their imported torch) are kept between tests, which
matters on a 2-core CI machine.  Every call has a deadline: a hang kills the
pool and fails the test, and the next test starts a fresh pool.
"""

from __future__ import annotations

import datetime
import os
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from syncnorm.launch import free_loopback_port


def caught(fn: Callable[..., object], *args: object) -> tuple[str | None, str]:
    """Run ``fn(*args)`` and return (exception type name, message) of what it raises,
    ``(None, "")`` if nothing: how a rank function reports an expected error."""
    try:
        fn(*args)
    except Exception as e:
        return type(e).__name__, str(e)
    return None, ""


COLLECTIVE_TIMEOUT_S = 60
"""Gloo's own bound on a collective inside the workers (its default is 30 minutes)."""


def _worker(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # W ranks share 2 cores
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """``world_size`` processes in one Gloo group; :meth:`run` runs a function on all."""

    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        port = free_loopback_port()
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        self._procs = [
            ctx.Process(
                target=_worker, args=(r, world_size, port, self._tasks[r], self._results), daemon=True
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 90) -> list[Any]:
        """Run ``fn(rank, world_size, *args)`` on every rank; return the results by rank.

        Raises ``AssertionError`` with the worker's traceback if any rank raised,
        ``TimeoutError`` (and kills the pool) if the ranks do not all answer in time.
        """
        for q in self._tasks:
            q.put((fn, args))
        answers: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=1.0)
                answers[rank] = (ok, value)
                continue
            except queue.Empty:
                pass
            missing = sorted(set(range(self.world_size)) - answers.keys())
            if not self.alive:
                codes = {r: p.exitcode for r, p in enumerate(self._procs)}
                self.close(force=True)
                raise RuntimeError(f"a rank process died during {fn.__name__} (exit codes {codes})")
            if time.monotonic() > deadline:
                self.close(force=True)
                raise TimeoutError(f"ranks {missing} did not finish {fn.__name__} within {timeout} s")
        failures = {r: v for r, (ok, v) in answers.items() if not ok}
        if failures:
            raise RankError(failures)
        return [answers[r][1] for r in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        if not force:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()


class RankError(AssertionError):
    """One or more ranks raised; ``tracebacks`` maps rank to its traceback."""

    def __init__(self, tracebacks: dict[int, str]) -> None:
        self.tracebacks = tracebacks
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(tracebacks.items()))
        super().__init__(text)
