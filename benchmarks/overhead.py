"""Per-layer cost of syncnorm next to local batch norm, the other SyncBN designs and
the bare collectives.

For each world size (local processes, one thread each) and channel count C, on
input (8, C, 8, 8) fp32 per rank, one run measures interleaved, round by round
(every case once per round, ``--repeats`` calls each, medians over ``--rounds``):

* local ``torch.nn.BatchNorm2d`` forward + backward,
* ``syncnorm.SyncBatchNorm`` forward + backward, as it runs by default (on CPU: the
  shared-memory all-gather, all ranks being on one host) and, on CPU, forced onto
  Gloo's all_gather (``primitive="all_gather"``, what ranks on several hosts use),
* the designs of torch.nn.SyncBatchNorm, detectron2 and mmcv forward + backward,
  re-implemented in :mod:`benchmarks.baselines` (plain tensor ops, same transport),
* on CUDA only, the real ``torch.nn.SyncBatchNorm``,
* a bare all_gather and a bare all_reduce of 2C + 1 fp32 values, what a SyncBN
  layer must at least exchange (per-channel mean and variance, and a count), and
  on CPU a bare shared-memory round of 2C + 2 float64 values,

and prints medians and ``(x - local) / floor`` for syncnorm and each design, where
the floor is two bare collectives (one forward, one backward) of the backend's
fastest collective (:data:`~syncnorm.transports.FASTEST_PRIMITIVE`: all_gather on
Gloo, all_reduce on NCCL).  On one host syncnorm does not use that collective, so
it can come in under the floor.

CPU runs use a Gloo group of local processes.  ``--device cuda`` runs one process
per GPU (by default as many as are visible; a 1-rank group is allowed and still
goes through syncnorm's collective) with the layers and collectives on an NCCL
group.  The CUDA path has not yet been run on a GPU.

    python -m benchmarks.overhead [--world-sizes 2,4] [--channels 64,256,1024]
                                  [--rounds 11] [--repeats 10] [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from benchmarks.baselines import DESIGNS, BaselineBatchNorm2d
from syncnorm import SyncBatchNorm
from syncnorm.launch import run_local_group
from syncnorm.transports.shared_memory import SharedMemoryChannel
from syncnorm.transports.torch_distributed import (
    FASTEST_PRIMITIVE,
    TorchDistributedReducer,
    all_gather_into,
    default_reducer,
)


@dataclass
class Placement:
    """Where one rank runs: its device and the group its layers synchronize over."""

    device: torch.device
    group: dist.ProcessGroup | None

    def synchronize(self) -> None:
        """Wait for the device, so that a host clock reads finished work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def place(rank: int, device_type: str) -> Placement:
    """CPU: the default Gloo group.  CUDA: this rank's GPU and an NCCL group over all ranks
    (the default group stays Gloo and serves the host-side barriers)."""
    if device_type == "cpu":
        return Placement(torch.device("cpu"), None)
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    return Placement(device, dist.new_group(backend="nccl"))


def syncnorm_reducer(group: dist.ProcessGroup | None) -> TorchDistributedReducer:
    """The reducer SyncBatchNorm picks for ``group``; for a 1-rank group (CUDA) one that
    still runs the collective, so that the measurement includes it."""
    return default_reducer(group) or TorchDistributedReducer(group)


def timed(fn: Callable[[], object], repeats: int, where: Placement) -> float:
    """Seconds per call of ``fn``, all ranks starting together."""
    where.synchronize()
    dist.barrier()  # start together, so collectives measure the exchange, not the skew
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    where.synchronize()
    return (time.perf_counter() - start) / repeats


def interleaved_medians(
    cases: dict[str, Callable[[], object]], rounds: int, repeats: int, where: Placement
) -> dict[str, float]:
    """Median milliseconds per call of each case, every case timed once per round."""
    for fn in cases.values():  # warm-up, and the layers' one-time handshakes
        fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(timed(fn, repeats, where))
    return {name: statistics.median(v) * 1e3 for name, v in samples.items()}


def _fwd_bwd(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], object]:
    return lambda: layer(x).backward(dy)


def _measure_one(world_size: int, c: int, rounds: int, repeats: int, where: Placement) -> dict:
    torch.manual_seed(dist.get_rank())
    device, group = where.device, where.group
    x = torch.randn(8, c, 8, 8, device=device, requires_grad=True)
    dy = torch.randn(8, c, 8, 8, device=device)
    reducer = syncnorm_reducer(group)
    layers: dict[str, nn.Module] = {
        "local_bn": nn.BatchNorm2d(c),
        "syncnorm": SyncBatchNorm(c, process_group=group, reducer=reducer),
    }
    if device.type == "cpu":
        gloo = TorchDistributedReducer(group, primitive="all_gather")
        layers["syncnorm_gloo"] = SyncBatchNorm(c, process_group=group, reducer=gloo)
    layers |= {f"{d}_design": BaselineBatchNorm2d(c, design=d, process_group=group) for d in DESIGNS}
    if device.type == "cuda":
        layers["torch_syncbn"] = nn.SyncBatchNorm(c, process_group=group)
    payload = torch.randn(2 * c + 1, device=device)
    gathered = payload.new_empty(world_size * payload.numel())
    cases = {name: _fwd_bwd(layer.to(device), x, dy) for name, layer in layers.items()}
    cases["all_gather"] = lambda: all_gather_into(gathered, payload, group)
    cases["all_reduce"] = lambda: dist.all_reduce(payload, group=group)
    if device.type == "cpu":
        channel, why = SharedMemoryChannel.open(group, 2 * c + 2)
        if channel is None:
            raise SystemExit(f"no shared-memory channel between the ranks: {why}")
        cases["shared_memory"] = lambda: channel.exchange(2 * c + 2, timeout_s=60.0)
    medians = interleaved_medians(cases, rounds, repeats, where)
    floor_primitive = FASTEST_PRIMITIVE[str(dist.get_backend(group)).lower()]
    floor = 2 * medians[floor_primitive]
    row: dict = {
        "world_size": world_size,
        "channels": c,
        "device": device.type,
        **{f"{k}_ms": round(v, 4) for k, v in medians.items()},
        "primitive": reducer.primitive,
        "floor_primitive": floor_primitive,
        "floor_ms": round(floor, 4),
        "overhead_over_floor": round((medians["syncnorm"] - medians["local_bn"]) / floor, 3),
    }
    for name in [n for n in layers if n not in ("local_bn", "syncnorm")]:
        row[f"{name}_over_floor"] = round((medians[name] - medians["local_bn"]) / floor, 3)
    return row


def _measure(
    rank: int, world_size: int, channels: list[int], rounds: int, repeats: int, device_type: str
) -> list[dict]:
    where = place(rank, device_type)
    return [_measure_one(world_size, c, rounds, repeats, where) for c in channels]


def environment_line(device_type: str) -> str:
    """One line naming the machine the figures come from."""
    if device_type == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, NCCL"
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, Gloo on loopback"


def print_tables(rows: list[dict], rounds: int, repeats: int, device_type: str) -> None:
    print(
        f"# {environment_line(device_type)}, median of {rounds} rounds x {repeats} calls, "
        "input (8, C, 8, 8) fp32 per rank, forward + backward"
    )
    cpu = device_type == "cpu"
    others = (["syncnorm_gloo"] if cpu else []) + [f"{d}_design" for d in DESIGNS]
    others += [] if cpu else ["torch_syncbn"]
    bare = ["all_gather", "all_reduce"] + (["shared_memory"] if cpu else [])
    titles = {"syncnorm_gloo": "syncnorm over Gloo", "torch_design": "torch design",
              "detectron2_design": "detectron2 design", "mmcv_design": "mmcv design",
              "torch_syncbn": "nn.SyncBatchNorm", "shared_memory": "shared-memory round"}  # fmt: skip
    print()
    print(f"Medians, ms per call (syncnorm: {rows[0]['primitive']})")
    print()
    head = [
        "ranks",
        "C",
        "local BN",
        "syncnorm",
        *(titles[d] for d in others),
        *(titles.get(b, b) for b in bare),
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [
            r["local_bn_ms"],
            r["syncnorm_ms"],
            *(r[f"{d}_ms"] for d in others),
            *(r[f"{b}_ms"] for b in bare),
        ]
        print(f"| {r['world_size']} | {r['channels']} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    print()
    print("(x - local BN) / floor, floor = 2 x the backend's fastest bare collective")
    print()
    head = ["ranks", "C", "floor", "floor ms", "syncnorm", *(titles[d] for d in others)]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        ratios = [r["overhead_over_floor"], *(r[f"{d}_over_floor"] for d in others)]
        print(
            f"| {r['world_size']} | {r['channels']} | 2 x {r['floor_primitive']} | {r['floor_ms']:.3f} | "
            + " | ".join(f"{v:.2f}" for v in ratios)
            + " |"
        )
    if device_type == "cuda" and any(r["world_size"] == 1 for r in rows):
        print("\nWith 1 rank nn.SyncBatchNorm runs plain batch norm; syncnorm still runs its collective.")


def world_sizes_for(text: str | None, device_type: str) -> list[int]:
    """``--world-sizes`` checked for the device: CPU 2 and 4 by default; CUDA one rank per
    visible GPU (NCCL refuses two ranks on one GPU), by default all of them."""
    if device_type == "cpu":
        sizes = [int(w) for w in (text or "2,4").split(",")]
        if any(w < 2 for w in sizes):
            raise SystemExit(f"world sizes must be at least 2 on CPU, got {text}")
        return sizes
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA build of torch and a visible GPU")
    gpus = torch.cuda.device_count()
    sizes = [int(w) for w in (text or str(gpus)).split(",")]
    if any(not 1 <= w <= gpus for w in sizes):
        raise SystemExit(f"world sizes must be between 1 and the {gpus} visible GPU(s) on CUDA, got {text}")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-sizes", help="comma-separated (default: 2,4 on CPU, all GPUs on CUDA)")
    parser.add_argument("--channels", default="64,256,1024")
    parser.add_argument("--rounds", type=int, default=11, help="rounds per case; medians are over rounds")
    parser.add_argument("--repeats", type=int, default=10, help="calls per case per round")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of tables")
    args = parser.parse_args()
    channels = [int(c) for c in args.channels.split(",")]
    rows = []
    for world in world_sizes_for(args.world_sizes, args.device):
        rows += run_local_group(_measure, world, channels, args.rounds, args.repeats, args.device)[0]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_tables(rows, args.rounds, args.repeats, args.device)


if __name__ == "__main__":
    main()
