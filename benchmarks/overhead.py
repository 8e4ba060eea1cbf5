"""Per-layer cost of syncnorm next to local batch norm and the bare collectives.

For each world size (local Gloo processes, one thread each) and channel count C,
on input (8, C, 8, 8) fp32, one run measures interleaved, round by round:

* local ``torch.nn.BatchNorm2d`` forward + backward,
* ``syncnorm.SyncBatchNorm`` forward + backward,
* a bare all_gather and a bare all_reduce of the forward payload (2C + 2 float64),

and prints medians and ``(syncnorm - local) / floor``, where the floor is two bare
collectives of the primitive syncnorm uses (one forward, one backward).

    python -m benchmarks.overhead [--world-sizes 2,4] [--channels 64,256,1024] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from syncnorm import SyncBatchNorm
from syncnorm.launch import run_local_group
from syncnorm.transports.torch_distributed import all_gather_into, default_reducer


def _timed(fn: Callable[[], object], repeats: int) -> float:
    dist.barrier()  # start together, so collectives measure the exchange, not the skew
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _measure_one(world_size: int, c: int, rounds: int, repeats: int) -> dict:
    torch.manual_seed(dist.get_rank())
    x = torch.randn(8, c, 8, 8, requires_grad=True)
    dy = torch.randn(8, c, 8, 8)
    local, sync = torch.nn.BatchNorm2d(c), SyncBatchNorm(c)
    payload = torch.randn(2 * c + 2, dtype=torch.float64)
    gathered = payload.new_empty(world_size * payload.numel())
    cases: dict[str, Callable[[], object]] = {
        "local_bn": lambda: local(x).backward(dy),
        "syncnorm": lambda: sync(x).backward(dy),
        "all_gather": lambda: all_gather_into(gathered, payload),
        "all_reduce": lambda: dist.all_reduce(payload),
    }
    for fn in cases.values():  # warm-up, and the layer's one-time handshake
        fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(_timed(fn, repeats))
    medians = {name: statistics.median(v) * 1e3 for name, v in samples.items()}
    reducer = default_reducer(None)
    assert reducer is not None
    floor = 2 * medians[reducer.primitive]
    return {
        "world_size": world_size,
        "channels": c,
        **{f"{k}_ms": round(v, 4) for k, v in medians.items()},
        "primitive": reducer.primitive,
        "floor_ms": round(floor, 4),
        "overhead_over_floor": round((medians["syncnorm"] - medians["local_bn"]) / floor, 3),
    }


def _measure(rank: int, world_size: int, channels: list[int], rounds: int, repeats: int) -> list[dict]:
    return [_measure_one(world_size, c, rounds, repeats) for c in channels]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-sizes", default="2,4")
    parser.add_argument("--channels", default="64,256,1024")
    parser.add_argument("--rounds", type=int, default=15, help="rounds per case; medians are over rounds")
    parser.add_argument("--repeats", type=int, default=10, help="calls per round")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = parser.parse_args()
    channels = [int(c) for c in args.channels.split(",")]
    rows = []
    for world in (int(w) for w in args.world_sizes.split(",")):
        rows += run_local_group(_measure, world, channels, args.rounds, args.repeats)[0]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, Gloo on loopback, "
        f"median of {args.rounds} rounds x {args.repeats} calls, input (8, C, 8, 8) fp32"
    )
    print(
        "| ranks | C | local BN ms | syncnorm ms | all_gather ms | all_reduce ms | (sync - local) / floor |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['world_size']} | {r['channels']} | {r['local_bn_ms']:.3f} | {r['syncnorm_ms']:.3f} | "
            f"{r['all_gather_ms']:.3f} | {r['all_reduce_ms']:.3f} | {r['overhead_over_floor']:.2f} |"
        )


if __name__ == "__main__":
    main()
