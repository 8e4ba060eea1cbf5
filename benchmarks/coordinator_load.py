"""Coordinator load: simulated workers sending ResNet-50-sized reports.

A ResNet-50 has 53 batch norm layers with 26,560 channels in all; each report
carries, per layer, the local mean and variance and the running mean and
variance (about 850 KB of float64).  The coordinator runs in its own process
pinned to one core (``taskset -c 0``); the simulated workers run here, on the
other cores, each sending reports back to back for a fixed time.  Prints
reports/s and the p50/p99 latency of the Report call.

    python -m benchmarks.coordinator_load [--workers 8] [--seconds 10]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time

import grpc
import numpy as np

from syncnorm.coordinator.v1 import coordinator_pb2 as pb
from syncnorm.coordinator.v1 import coordinator_pb2_grpc as pb_grpc


def resnet50_bn_channels() -> list[int]:
    """Channels of the 53 BN layers of a ResNet-50, in order."""
    channels = [64]
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            channels += [width, width, 4 * width]
            if block == 0:
                channels.append(4 * width)  # the downsample branch
    return channels


def make_report(worker: int, step: int, channels: list[int], rng: np.random.Generator) -> pb.ReportRequest:
    layers = []
    for index, c in enumerate(channels):
        layers.append(pb.LayerStats(
            layer=f"bn{index}", count=32 * 7 * 7, mean=rng.normal(size=c).tolist(),
            var=rng.uniform(0.5, 2.0, size=c).tolist(), running_mean=rng.normal(size=c).tolist(),
            running_var=rng.uniform(0.5, 2.0, size=c).tolist(),
        ))  # fmt: skip
    return pb.ReportRequest(run_id="load", worker_id=f"w{worker}", step=step, device_kind="cuda",
                            batch_size=32, step_time_seconds=0.2, layers=layers)  # fmt: skip


def _worker(address: str, index: int, seconds: float, latencies: list[float], lock: threading.Lock) -> None:
    rng = np.random.default_rng(index)
    channels = resnet50_bn_channels()
    reports = [make_report(index, step, channels, rng) for step in range(4)]  # built once, reused
    mine = []
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 16 << 20)]) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        deadline = time.perf_counter() + seconds
        step = 0
        while time.perf_counter() < deadline:
            report = reports[step % len(reports)]
            report.step = step
            started = time.perf_counter()
            stub.Report(report, timeout=30)
            mine.append(time.perf_counter() - started)
            step += 1
    with lock:
        latencies.extend(mine)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    server = subprocess.Popen(
        [*pin, sys.executable, "-m", "syncnorm", "coordinator", "--host", "127.0.0.1", "--grpc-port", "0",
         "--metrics-port", "0", "--stale-after", "3600"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        match = re.search(r"gRPC on 127\.0\.0\.1:(\d+)", server.stdout.readline())
        assert match, "the coordinator did not start"
        address = f"127.0.0.1:{match.group(1)}"
        latencies: list[float] = []
        lock = threading.Lock()
        threads = [
            threading.Thread(target=_worker, args=(address, w, args.seconds, latencies, lock))
            for w in range(args.workers)
        ]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=10)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    size = make_report(0, 0, resnet50_bn_channels(), np.random.default_rng(0)).ByteSize()
    print(
        f"{args.workers} workers, ResNet-50-sized reports ({len(resnet50_bn_channels())} layers, "
        f"{sum(resnet50_bn_channels())} channels, {size / 1e3:.0f} kB), coordinator pinned to one core"
        f"{'' if pin else ' (taskset missing: not pinned)'}:\n"
        f"{len(latencies) / elapsed:.0f} reports/s, p50 {1e3 * statistics.median(latencies):.1f} ms, "
        f"p99 {1e3 * p99:.1f} ms over {len(latencies)} reports"
    )


if __name__ == "__main__":
    main()
