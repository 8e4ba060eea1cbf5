"""Round latency of the SyncBN transports, side by side on one machine.

For 2 and 4 workers and C in {64, 256, 1024}: one forward round of C channels
(payload 2C + 2 float64 values per worker) through

* Gloo ``all_gather`` and ``all_reduce`` between local processes (bare collectives),
* syncnorm's torch.distributed reducer (the same collective plus packing and checks),
* syncnorm's Ray actor aggregator (one ``reduce`` call per worker per round),

medians over rounds, all in one run.

    python -m benchmarks.transports [--world-sizes 2,4] [--channels 64,256,1024] [--rounds 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

from syncnorm.launch import run_local_group
from syncnorm.moments import Moments
from syncnorm.transports.base import LayerKey
from syncnorm.transports.torch_distributed import TorchDistributedReducer, all_gather_into


def _moments(c: int) -> Moments:
    return Moments(torch.tensor(8.0), torch.randn(c), torch.rand(c))


def _median_ms(fn: object, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def _gloo_one(world_size: int, reducer: TorchDistributedReducer, c: int, rounds: int) -> dict[str, float]:
    payload = torch.randn(2 * c + 2, dtype=torch.float64)
    gathered = payload.new_empty(world_size * payload.numel())
    local, key = _moments(c), LayerKey("bench", c)
    reducer.merge_moments(local, key)  # the one-time handshake
    dist.barrier()
    return {
        "all_gather": _median_ms(lambda: all_gather_into(gathered, payload), rounds),
        "all_reduce": _median_ms(lambda: dist.all_reduce(payload), rounds),
        "torch_reducer": _median_ms(lambda: reducer.merge_moments(local, key), rounds),
    }


def _gloo(rank: int, world_size: int, channels: list[int], rounds: int) -> dict[int, dict[str, float]]:
    reducer = TorchDistributedReducer()
    return {c: _gloo_one(world_size, reducer, c, rounds) for c in channels}


def _actor_rounds(world_size: int, channels: list[int], rounds: int) -> dict[int, float]:
    import ray

    from syncnorm.transports.ray_actor import ActorReducer, start_aggregator

    @ray.remote(num_cpus=0)
    def worker(aggregator: object, rank: int, c: int) -> float:
        torch.set_num_threads(1)
        reducer = ActorReducer(aggregator, rank, world_size, run_id=f"bench-{world_size}-{c}")
        local, key = _moments(c), LayerKey("bench", c)
        reducer.merge_moments(local, key)
        return _median_ms(lambda: reducer.merge_moments(local, key), rounds)

    aggregator = start_aggregator()
    result = {}
    for c in channels:
        result[c] = statistics.median(ray.get([worker.remote(aggregator, r, c) for r in range(world_size)]))
    ray.kill(aggregator)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world-sizes", default="2,4")
    parser.add_argument("--channels", default="64,256,1024")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    channels = [int(c) for c in args.channels.split(",")]
    worlds = [int(w) for w in args.world_sizes.split(",")]

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on 127.0.0.1 only
    import ray

    ray.init(num_cpus=max(worlds), include_dashboard=False, log_to_driver=False)
    print(
        f"# {os.cpu_count()} cores, torch {torch.__version__}, ray {ray.__version__}, loopback, "
        f"median of {args.rounds} rounds, one forward round (2C + 2 float64 per worker)"
    )
    print(
        "| workers | C | Gloo all_gather ms | Gloo all_reduce ms | syncnorm torch reducer ms | Ray actor ms |"
    )
    print("|---|---|---|---|---|---|")
    for world in worlds:
        gloo = run_local_group(_gloo, world, channels, args.rounds)[0]
        actor = _actor_rounds(world, channels, args.rounds)
        for c in channels:
            g = gloo[c]
            print(
                f"| {world} | {c} | {g['all_gather']:.3f} | {g['all_reduce']:.3f} | "
                f"{g['torch_reducer']:.3f} | {actor[c]:.3f} |"
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
