"""Dead and hung peers: the survivors raise a clear error within the bound, never hang."""

from __future__ import annotations

import datetime
import os
import queue
import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import syncnorm
from syncnorm.launch import free_loopback_port
from syncnorm.transports.torch_distributed import SHARED_MEMORY_ENV

FAIL_AT_STEP = 3
BOUND_S = 3.0


def _train_until_fault(rank: int, port: int, fault: str, transport: str, results: mp.Queue) -> None:
    os.environ["SYNCNORM_TIMEOUT_S"] = str(BOUND_S)
    if transport == "gloo":
        os.environ[SHARED_MEMORY_ENV] = "0"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=60),  # Gloo's own bound, far above ours
    )  # fmt: skip
    torch.manual_seed(0)
    model = syncnorm.convert_sync_batchnorm(
        torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU())
    )
    for step in range(1, 10):
        if rank == 1 and step == FAIL_AT_STEP:
            if fault == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            for _ in range(120):  # hung: alive but never comes, until the test kills it (bounded)
                time.sleep(0.5)
        started = time.monotonic()
        try:
            model(torch.randn(4, 1, 6, 6)).sum().backward()
        except Exception as error:
            results.put((type(error).__name__, str(error), time.monotonic() - started, step))
            return
    results.put(("finished", "", 0.0, 10))


@pytest.mark.parametrize("transport", ["shared_memory", "gloo"])
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_survivor_raises_naming_layer_and_call_within_the_bound(fault: str, transport: str) -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_loopback_port()
    procs = [
        ctx.Process(target=_train_until_fault, args=(r, port, fault, transport, results)) for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        kind, message, waited, step = results.get(timeout=90)
    except queue.Empty:
        pytest.fail("the surviving rank neither finished nor raised within 90 s")
    finally:
        for p in procs:
            p.kill()
            p.join(timeout=10)
    assert kind == "SynchronizationError", message
    assert step == FAIL_AT_STEP
    assert "SyncBatchNorm layer '1' (num_features=3)" in message
    assert f"call {FAIL_AT_STEP} of this layer" in message
    assert "SYNCNORM_TIMEOUT_S" in message
    assert waited < BOUND_S + 5
    if transport == "shared_memory" and fault == "killed":
        # the waiting rank watches its peers: a dead one is reported before the timeout
        assert "rank(s) 1 exited" in message and waited < BOUND_S, (waited, message)
