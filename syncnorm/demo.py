"""``syncnorm demo``: the main job on an embedded default, no cluster needed.

Trains the digits CNN on 4 local Gloo workers with uneven batch sizes, once with
syncnorm's SyncBatchNorm and once with plain per-worker BatchNorm, and once in a
single process on the same global batches: with SyncBN (and exact uneven-batch
gradients) the 4 workers end where the single process ends.  The demo trains in
float64: small-batch SGD amplifies float32 rounding (different summation orders
alone) into visibly different weights after a few hundred steps, which would hide
the comparison; in float64 the gap stays at rounding level.  The SyncBN workers
report to an in-process coordinator, whose view of them closes the report.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from syncnorm.coordinator.server import start_coordinator
from syncnorm.launch import run_local_group
from syncnorm.train.config import TrainConfig
from syncnorm.train.loop import train_rank, train_worker


@dataclass(frozen=True)
class DemoConfig:
    """Args:
    batch_sizes: one per worker; uneven on purpose.
    epochs, lr, seed: as for ``syncnorm train``.
    """

    batch_sizes: tuple[int, ...] = (2, 4, 6, 20)
    epochs: int = 3
    lr: float = 0.05
    seed: int = 0


def run_demo(demo: DemoConfig) -> str:
    """Run the three trainings and return the report."""
    base = TrainConfig(
        batch_sizes=demo.batch_sizes, epochs=demo.epochs, lr=demo.lr, seed=demo.seed, device="cpu",
        return_state=True, dtype="float64",
    )  # fmt: skip
    world = len(demo.batch_sizes)
    coordinator = start_coordinator(host="127.0.0.1")  # in-process, loopback only
    address = f"127.0.0.1:{coordinator.grpc_port}"
    try:
        sync_config = replace(base, norm="sync", coordinator=address, run_id="demo", report_every=5)
        sync = run_local_group(train_rank, world, sync_config, timeout_s=600)[0]
        seen = coordinator.coordinator.list_workers("demo")
    finally:
        coordinator.stop()
    local = run_local_group(train_rank, world, replace(base, norm="local"), timeout_s=600)[0]
    single = train_worker(replace(base, norm="local", batch_sizes=(sum(demo.batch_sizes),), progress=False))
    assert sync.state_dict is not None and single.state_dict is not None
    gap = max(float((sync.state_dict[k] - v).abs().max()) for k, v in single.state_dict.items())

    sizes = ",".join(map(str, demo.batch_sizes))
    rows = [
        ("syncnorm SyncBatchNorm", world, sizes, sync),
        ("torch BatchNorm per worker", world, sizes, local),
        ("one process, global batch", 1, str(sum(demo.batch_sizes)), single),
    ]
    lines = [
        f"syncnorm demo: digits (scikit-learn, 1,437 train / 360 test images), {demo.epochs} epochs of "
        f"{sync.steps // demo.epochs} steps, float64, Gloo on 127.0.0.1",
        "",
        f"{'run':<28}{'workers':>8}  {'batch sizes':<14}{'test accuracy':>14}{'time':>9}",
    ]
    for name, workers, batch, result in rows:
        lines.append(
            f"{name:<28}{workers:>8}  {batch:<14}{result.test_accuracy:>14.3f}{result.seconds:>8.1f}s"
        )
    lines += [
        "",
        f"largest difference between the SyncBN workers' final weights and buffers and the single "
        f"process's: {gap:.1e}",
        "",
        f"coordinator (in-process, gRPC {address}, metrics were served on "
        f"http://127.0.0.1:{coordinator.metrics_port}/metrics): batch-size mismatch "
        f"{seen.batch_size_mismatch_ratio:.1f}, largest drift "
        f"{max(w.stats_drift for w in seen.workers):.2f}, recommended batch sizes "
        f"{','.join(str(w.recommended_batch_size) for w in seen.workers)}",
    ]
    return "\n".join(lines)
