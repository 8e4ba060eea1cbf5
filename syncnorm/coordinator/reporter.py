"""The worker side: a reporter that sends SyncBN statistics to the coordinator.

Every ``report_every`` steps it snapshots, per SyncBN layer, this worker's
*local* (pre-synchronization) batch count, mean and variance and the running
buffers, and queues them; a background thread builds the report (packed
blocks, see ``PackedLayerStats`` and :func:`build_report`) and sends it.  The training
thread never waits on the network: the queue is bounded, a full queue drops the
report (counted and logged), and a coordinator that is down or restarting
costs failed sends (counted and logged), never an exception in training.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import grpc
import torch
from torch import Tensor, nn

from syncnorm.batchnorm import SyncBatchNorm
from syncnorm.coordinator.security import call_metadata, open_channel
from syncnorm.coordinator.v1 import coordinator_pb2 as pb
from syncnorm.coordinator.v1 import coordinator_pb2_grpc as pb_grpc
from syncnorm.moments import Moments

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerSnapshot:
    """One layer at a reported step: this worker's batch moments and its running buffers."""

    name: str
    local: Moments
    running: tuple[Tensor, Tensor] | None


def _block(vectors: list[Tensor], dtype: torch.dtype) -> bytes:
    values = torch.cat([v.detach().reshape(-1) for v in vectors]).to("cpu", dtype).numpy()
    return values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes()


def build_report(header: dict, layers: list[LayerSnapshot]) -> pb.ReportRequest:
    """The ``ReportRequest`` for ``layers``: one ``PackedLayerStats`` unless only
    some layers have running buffers, which the packed form cannot say; then one
    ``LayerStats`` per layer.  The packed blocks are float32 when every value
    is held in float32 or narrower (nothing is lost, and the report is half the
    size), float64 otherwise."""
    with_running = [snap.running is not None for snap in layers]
    if all(with_running) or not any(with_running):
        vectors = {
            "mean": [snap.local.mean for snap in layers],
            "var": [snap.local.biased_var for snap in layers],
        }
        if layers and all(with_running):
            vectors["running_mean"] = [snap.running[0] for snap in layers]  # type: ignore[index]
            vectors["running_var"] = [snap.running[1] for snap in layers]  # type: ignore[index]
        narrow = all(v.dtype.itemsize <= 4 for block in vectors.values() for v in block)
        dtype = torch.float32 if narrow else torch.float64
        value_type = pb.PackedLayerStats.ValueType.Value(f"VALUE_TYPE_FLOAT{32 if narrow else 64}")
        packed = pb.PackedLayerStats(
            layer=[snap.name for snap in layers],
            channels=[snap.local.mean.numel() for snap in layers],
            count=[float(snap.local.count) for snap in layers],
            value_type=value_type,
            **{block: _block(block_vectors, dtype) for block, block_vectors in vectors.items()},
        )
        return pb.ReportRequest(**header, packed=packed)
    messages = []
    for snap in layers:
        entry = pb.LayerStats(layer=snap.name, count=float(snap.local.count), mean=snap.local.mean.tolist(),
                              var=snap.local.biased_var.tolist())  # fmt: skip
        if snap.running is not None:
            entry.running_mean.extend(snap.running[0].tolist())
            entry.running_var.extend(snap.running[1].tolist())
        messages.append(entry)
    return pb.ReportRequest(**header, layers=messages)


class StatsReporter:
    """Reports a model's SyncBN statistics every few steps; see the module docstring.

    Example::

        reporter = StatsReporter(model, "coordinator:50051", run_id="exp7", worker_id=f"rank-{rank}")
        for step, (x, y) in enumerate(batches):
            started = time.perf_counter()
            ...  # forward, backward, optimizer step
            reporter.step(step, batch_size=len(x), step_time_s=time.perf_counter() - started)
        reporter.close()

    Args:
        model: the model whose :class:`SyncBatchNorm` layers are reported.
        address: the coordinator's ``host:port``.
        run_id, worker_id: identify the run and this worker in it.
        report_every: report on steps that are multiples of this.
        queue_size: reports waiting to be sent at most; more are dropped.
        deadline_s: deadline of each gRPC call.
        token, root_certificates: bearer token and PEM CA for a secured coordinator.
    """

    def __init__(
        self,
        model: nn.Module,
        address: str,
        run_id: str,
        worker_id: str,
        report_every: int = 10,
        queue_size: int = 8,
        deadline_s: float = 5.0,
        token: str | None = None,
        root_certificates: bytes | None = None,
    ) -> None:
        if report_every < 1:
            raise ValueError(f"report_every must be at least 1, got {report_every}")
        self.layers = {
            (m.layer_name or name): m for name, m in model.named_modules() if isinstance(m, SyncBatchNorm)
        }
        if not self.layers:
            raise ValueError("StatsReporter found no syncnorm.SyncBatchNorm layers in the model")
        self.run_id, self.worker_id = run_id, worker_id
        self.report_every = report_every
        self.deadline_s = deadline_s
        self.sent = self.dropped = self.failed = 0
        self._latest: dict[str, Moments] = {}
        self._observers = {name: self._observer(name) for name in self.layers}
        for name, layer in self.layers.items():
            layer.moment_observers.append(self._observers[name])
        self._queue: queue.Queue[tuple[dict, list[LayerSnapshot]] | None] = queue.Queue(maxsize=queue_size)
        self._metadata = call_metadata(token)
        self._channel = open_channel(address, root_certificates)
        self._stub = pb_grpc.CoordinatorStub(self._channel)
        self._device_kind = next(iter(self.layers.values())).running_mean.device.type  # type: ignore[union-attr]
        self._thread = threading.Thread(target=self._send_loop, name="syncnorm-reporter", daemon=True)
        self._thread.start()

    def _observer(self, name: str):  # noqa: ANN202
        def observe(local: Moments, _total: Moments) -> None:
            self._latest[name] = local  # small C-vectors; copied off the device only when reported

        return observe

    def step(self, step: int, batch_size: int, step_time_s: float) -> None:
        """Call after each training step; queues a report every ``report_every`` steps.

        Only references and device-side copies of small C-vectors are taken here;
        the background thread copies them to the host and builds the message."""
        if step % self.report_every:
            return
        layers = []
        for name, layer in self.layers.items():
            local = self._latest.get(name)
            if local is None:
                continue
            running = None
            if layer.running_mean is not None and layer.running_var is not None:
                running = (layer.running_mean.detach().clone(), layer.running_var.detach().clone())
            layers.append(LayerSnapshot(name, local, running))
        if not layers:  # no SyncBN layer has run yet
            return
        header = {"run_id": self.run_id, "worker_id": self.worker_id, "step": step,
                  "device_kind": self._device_kind, "batch_size": batch_size,
                  "step_time_seconds": step_time_s}  # fmt: skip
        try:
            self._queue.put_nowait((header, layers))
        except queue.Full:
            self.dropped += 1
            log.warning(
                "syncnorm reporter: queue full, dropped the report of step %d (%d so far)", step, self.dropped
            )

    def _send_loop(self) -> None:
        while True:
            queued = self._queue.get()
            if queued is None:
                return
            header, layers = queued
            try:
                self._stub.Report(
                    build_report(header, layers), timeout=self.deadline_s, metadata=self._metadata
                )
                self.sent += 1
            except Exception as error:  # never let one report stop the reporting thread
                self.failed += 1
                if self.failed == 1 or self.failed % 100 == 0:
                    reason = error.code() if isinstance(error, grpc.RpcError) else repr(error)
                    log.warning("syncnorm reporter: %d report(s) not delivered (%s)", self.failed, reason)

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is queued (waiting at most ``timeout_s``), then stop."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self._queue.put(None, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join(max(0.0, deadline - time.monotonic()))
        for name, layer in self.layers.items():
            layer.moment_observers.remove(self._observers[name])
        self._channel.close()
