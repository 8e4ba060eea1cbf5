"""Coordinator load: simulated workers sending ResNet-50-sized reports.

A ResNet-50 has 53 batch norm layers with 26,560 channels in all; each report
carries, per layer, the local mean and variance and the running mean and
variance (about 850 KB in float64, 425 KB in float32).  The coordinator runs in its own process
pinned to one core (``taskset -c 0``); the simulated workers run here, on the
other cores, each sending reports back to back for a fixed time.  Prints
reports/s and the p50/p99 latency of the Report call, for the coordinator and,
side by side, for a bare gRPC server of the same service whose Report does
nothing (the cost of moving the bytes, which no coordinator code can go below)
and for the coordinator with ``--state-dir`` (every report committed to SQLite
before it is answered), with the layers sent in each of the ``ENCODINGS``.

    python -m benchmarks.coordinator_load [--workers 4] [--seconds 10]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

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


ENCODINGS = {"layer messages": None, "packed float64": "<f8", "packed float32": "<f4"}
"""How a report carries its layers: one ``LayerStats`` each (float64), or one
``PackedLayerStats`` of float64 or float32 blocks (what ``StatsReporter`` sends
for a model trained in float64, or in fp32/fp16/bf16)."""


def make_report(
    worker: int, step: int, channels: list[int], rng: np.random.Generator, encoding: str = "packed float32"
) -> pb.ReportRequest:
    """A report of random statistics in one of the ``ENCODINGS``.  Built with numpy
    alone: the load generator runs no torch operations, whose thread pool would
    compete with gRPC's threads for the cores."""
    names = [f"bn{index}" for index in range(len(channels))]
    blocks = {
        "mean": [rng.normal(size=c) for c in channels],
        "var": [rng.uniform(0.5, 2.0, size=c) for c in channels],
        "running_mean": [rng.normal(size=c) for c in channels],
        "running_var": [rng.uniform(0.5, 2.0, size=c) for c in channels],
    }
    report = pb.ReportRequest(run_id="load", worker_id=f"w{worker}", step=step, device_kind="cuda",
                              batch_size=32, step_time_seconds=0.2)  # fmt: skip
    count = 32.0 * 7 * 7
    dtype = ENCODINGS[encoding]
    if dtype is not None:
        Packed = pb.PackedLayerStats
        value_type = Packed.VALUE_TYPE_FLOAT32 if dtype == "<f4" else Packed.VALUE_TYPE_FLOAT64
        report.packed.CopyFrom(Packed(
            layer=names, channels=channels, count=[count] * len(channels), value_type=value_type,
            **{k: np.concatenate(v).astype(dtype).tobytes() for k, v in blocks.items()},
        ))  # fmt: skip
        return report
    for index, name in enumerate(names):
        report.layers.append(
            pb.LayerStats(layer=name, count=count, **{k: v[index].tolist() for k, v in blocks.items()})
        )
    return report


def _worker(
    address: str, index: int, seconds: float, encoding: str, latencies: list[float], lock: threading.Lock
) -> None:
    rng = np.random.default_rng(index)
    channels = resnet50_bn_channels()
    # Serialized once: the load generator's own protobuf work (0.7 ms per packed
    # report) would otherwise share the client core with gRPC and cap the rate it
    # can offer.  A message followed by another sets the latter's fields, so each
    # call appends only its step.
    bodies = [make_report(index, 0, channels, rng, encoding).SerializeToString() for _ in range(4)]
    mine = []
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 16 << 20)]) as channel:
        report = channel.unary_unary(
            "/syncnorm.coordinator.v1.Coordinator/Report", response_deserializer=pb.ReportResponse.FromString
        )
        deadline = time.perf_counter() + seconds
        step = 0
        while time.perf_counter() < deadline:
            request = bodies[step % len(bodies)] + pb.ReportRequest(step=step).SerializeToString()
            started = time.perf_counter()
            report(request, timeout=30)
            mine.append(time.perf_counter() - started)
            step += 1
    with lock:
        latencies.extend(mine)


class _BareCoordinator(pb_grpc.CoordinatorServicer):
    def Report(self, request: pb.ReportRequest, context: grpc.ServicerContext) -> pb.ReportResponse:
        return pb.ReportResponse(reports_received=1)


def serve_bare() -> None:
    """A Coordinator service whose Report only answers (gRPC's own cost)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.max_receive_message_length", 64 << 20)])  # fmt: skip
    pb_grpc.add_CoordinatorServicer_to_server(_BareCoordinator(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"gRPC on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def measure(server_command: list[str], workers: int, seconds: float, encoding: str) -> list[float]:
    """Start a server pinned to core 0, load it from ``workers`` threads; the latencies."""
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    server = subprocess.Popen([*pin, *server_command], stdout=subprocess.PIPE, text=True)
    try:
        match = re.search(r"gRPC on 127\.0\.0\.1:(\d+)", server.stdout.readline())  # type: ignore[union-attr]
        assert match, "the server did not start"
        address = f"127.0.0.1:{match.group(1)}"
        latencies: list[float] = []
        lock = threading.Lock()
        threads = [
            threading.Thread(target=_worker, args=(address, w, seconds, encoding, latencies, lock))
            for w in range(workers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.terminate()
        server.wait(timeout=10)
    return sorted(latencies)


def _summary(latencies: list[float], seconds: float) -> str:
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return (
        f"{len(latencies) / seconds:6.0f} reports/s, p50 {1e3 * statistics.median(latencies):5.1f} ms, "
        f"p99 {1e3 * p99:5.1f} ms over {len(latencies)} reports"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare()
        return
    coordinator = [sys.executable, "-m", "syncnorm", "coordinator", "--host", "127.0.0.1", "--grpc-port", "0",
                   "--metrics-port", "0", "--stale-after", "3600"]  # fmt: skip
    bare = [sys.executable, "-m", "benchmarks.coordinator_load", "--serve-bare"]
    channels = resnet50_bn_channels()
    sizes = {e: make_report(0, 0, channels, np.random.default_rng(0), e).ByteSize() for e in ENCODINGS}
    print(
        f"{args.workers} workers, ResNet-50-sized reports ({len(channels)} layers, {sum(channels)} channels; "
        + ", ".join(f"{e} {size / 1e3:.0f} kB" for e, size in sizes.items())
        + f"), server pinned to one core{'' if shutil.which('taskset') else ' (unpinned)'}:"
    )
    rates = {}
    for encoding in ENCODINGS:
        with tempfile.TemporaryDirectory() as state_dir:
            servers = (("bare gRPC", bare), ("coordinator", coordinator),
                       ("coordinator --state-dir", [*coordinator, "--state-dir", state_dir]))  # fmt: skip
            for server, command in servers:
                latencies = measure(command, args.workers, args.seconds, encoding)
                rates[server, encoding] = len(latencies) / args.seconds
                print(f"  {server + ', ' + encoding:<41}{_summary(latencies, args.seconds)}", flush=True)
        ratio = rates["coordinator", encoding] / rates["bare gRPC", encoding]
        print(f"  coordinator / bare gRPC throughput, {encoding}: {ratio:.2f}")


if __name__ == "__main__":
    main()
