"""The coordinator: runs' state behind a lock, served over gRPC, read by Prometheus."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from syncnorm.coordinator.analysis import batch_size_mismatch_ratio
from syncnorm.coordinator.report import REJECTION_REASONS, InvalidReport, parse_report
from syncnorm.coordinator.state import RunState
from syncnorm.coordinator.store import StateStore
from syncnorm.coordinator.v1 import coordinator_pb2 as pb
from syncnorm.coordinator.v1 import coordinator_pb2_grpc as pb_grpc


class Coordinator:
    """Every run's :class:`RunState`; safe to call from gRPC's worker threads.

    Args:
        momentum: EMA momentum of the global statistics.
        stale_after_s: a worker that has not reported for this long is stale.
        store: where state persists (``--state-dir``); loaded at start, and every
            accepted report is committed there before it is acknowledged.
    """

    def __init__(
        self, momentum: float = 0.1, stale_after_s: float = 60.0, store: StateStore | None = None
    ) -> None:
        self.momentum = momentum
        self.stale_after_s = stale_after_s
        self.store = store
        self.runs: dict[str, RunState] = {}
        self.rejected: Counter[str] = Counter()
        if store is not None:
            self.runs, self.rejected = store.load(momentum, stale_after_s)
        self.lock = threading.Lock()

    def report(self, message: pb.ReportRequest, now: float | None = None) -> int:
        """Validate and take one report; returns the run's report count.
        Raises :class:`InvalidReport` (and changes nothing) for a bad report."""
        with self.lock:
            run = self.runs.get(message.run_id)
            try:
                report = parse_report(message, run.channels() if run else None)
            except InvalidReport as error:
                self.rejected[error.reason] += 1
                if self.store is not None:
                    self.store.save_rejection(error.reason)
                raise
            if run is None:
                run = self.runs[report.run_id] = RunState(report.run_id, self.momentum, self.stale_after_s)
            estimates_changed = run.apply(report, now)
            if self.store is not None:
                try:
                    self.store.save_report(run, report.worker_id, message, estimates_changed)
                except Exception:
                    # Not durable, so not accepted: go back to what the store holds.
                    self.runs, self.rejected = self.store.load(self.momentum, self.stale_after_s)
                    raise
            return run.reports

    def run(self, run_id: str) -> RunState:
        run = self.runs.get(run_id)
        if run is None:
            raise KeyError(run_id)
        return run

    def global_stats(self, run_id: str) -> pb.GetGlobalStatsResponse:
        with self.lock:
            run = self.run(run_id)
            layers = []
            estimates = run.estimates()
            for name in sorted(run.layout.names):
                entry = pb.GlobalLayerStats(layer=name)
                cumulative = estimates.cumulative.get(name)
                if cumulative is not None:
                    entry.count = float(cumulative.count)
                    entry.cumulative_mean.extend(cumulative.mean.tolist())
                    entry.cumulative_var.extend(cumulative.unbiased_var.tolist())
                ema = estimates.ema.get(name)
                if ema is not None:
                    entry.ema_mean.extend(ema[0].tolist())
                    entry.ema_var.extend(ema[1].tolist())
                layers.append(entry)
            return pb.GetGlobalStatsResponse(run_id=run_id, layers=layers, step=max(run.latest_step, 0))

    def list_workers(self, run_id: str, now: float | None = None) -> pb.ListWorkersResponse:
        now = time.time() if now is None else now
        with self.lock:
            run = self.run(run_id)
            live = run.live(now)
            sizes = run.batch_sizes(now)
            total = sum(sizes.values())
            recommended = run.recommendations(now=now) if total >= len(sizes) else {}
            snapshot = run.snapshot(now)
            workers = []
            for worker_id, record in sorted(run.workers.items()):
                drift, ratio = snapshot.worker_drift(worker_id)
                report = record.report
                workers.append(pb.WorkerInfo(
                    worker_id=worker_id, device_kind=report.device_kind, step=report.step,
                    batch_size=report.batch_size, batch_share=report.batch_size / total if total else 0.0,
                    step_time_seconds=report.step_time_seconds, stats_drift=drift, log_var_ratio=ratio,
                    last_report_unix_seconds=record.last_seen, stale=worker_id not in live,
                    recommended_batch_size=recommended.get(worker_id, 0),
                ))  # fmt: skip
            mismatch = batch_size_mismatch_ratio(list(sizes.values()))
            return pb.ListWorkersResponse(
                run_id=run_id, workers=workers, global_batch_size=total, batch_size_mismatch_ratio=mismatch,
                running_stats_divergence=snapshot.divergence,
            )  # fmt: skip

    def recommend(self, run_id: str, global_batch: int | None) -> dict[str, int]:
        with self.lock:
            return self.run(run_id).recommendations(global_batch or None)


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """gRPC face of a :class:`Coordinator`: bad reports get ``INVALID_ARGUMENT`` with
    the reason, unknown runs ``NOT_FOUND``."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def Report(self, request: pb.ReportRequest, context: grpc.ServicerContext) -> pb.ReportResponse:
        try:
            return pb.ReportResponse(reports_received=self.coordinator.report(request))
        except InvalidReport as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise  # abort raises; this keeps type checkers informed

    def GetGlobalStats(
        self, request: pb.GetGlobalStatsRequest, context: grpc.ServicerContext
    ) -> pb.GetGlobalStatsResponse:
        return self._known(context, request.run_id, lambda: self.coordinator.global_stats(request.run_id))

    def ListWorkers(
        self, request: pb.ListWorkersRequest, context: grpc.ServicerContext
    ) -> pb.ListWorkersResponse:
        return self._known(context, request.run_id, lambda: self.coordinator.list_workers(request.run_id))

    def RecommendBatchSizes(
        self, request: pb.RecommendBatchSizesRequest, context: grpc.ServicerContext
    ) -> pb.RecommendBatchSizesResponse:
        def answer() -> pb.RecommendBatchSizesResponse:
            sizes = self.coordinator.recommend(request.run_id, request.global_batch_size)
            return pb.RecommendBatchSizesResponse(batch_sizes=sizes, global_batch_size=sum(sizes.values()))

        try:
            return self._known(context, request.run_id, answer)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise

    @staticmethod
    def _known(context: grpc.ServicerContext, run_id: str, answer):  # noqa: ANN001, ANN205
        try:
            return answer()
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no reports for run {run_id!r}")
            raise


class CoordinatorCollector(Collector):
    """Prometheus metrics computed from the coordinator's state at scrape time.

    Cardinality stays bounded: series per run and per worker, never per worker and layer.
    """

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        c = self.coordinator
        now = time.time()
        batch = GaugeMetricFamily(
            "syncnorm_worker_batch_size", "Latest batch size of each worker", labels=["run", "worker"]
        )
        global_batch = GaugeMetricFamily(
            "syncnorm_global_batch_size", "Sum of the live workers' batch sizes", labels=["run"]
        )
        mismatch = GaugeMetricFamily(
            "syncnorm_batch_size_mismatch_ratio",
            "Largest / smallest live batch size (1 = balanced)",
            labels=["run"],
        )
        worker_drift = GaugeMetricFamily(
            "syncnorm_worker_stats_drift",
            "Max over layers of the standardized mean shift of a worker",
            labels=["run", "worker"],
        )
        layer_drift = GaugeMetricFamily(
            "syncnorm_layer_stats_drift",
            "Max over workers of the standardized mean shift in a layer",
            labels=["run", "layer"],
        )
        divergence = GaugeMetricFamily(
            "syncnorm_running_stats_divergence",
            "How far the workers' running buffers are apart",
            labels=["run"],
        )
        last = GaugeMetricFamily(
            "syncnorm_worker_last_report_timestamp_seconds",
            "Unix time of a worker's last report",
            labels=["run", "worker"],
        )
        workers = GaugeMetricFamily("syncnorm_workers", "Workers by state", labels=["run", "state"])
        reports = CounterMetricFamily("syncnorm_reports", "Reports accepted", labels=["run"])
        rejected = CounterMetricFamily("syncnorm_reports_rejected", "Reports rejected", labels=["reason"])
        recommended = GaugeMetricFamily(
            "syncnorm_recommended_batch_size",
            "Batch size proportional to throughput",
            labels=["run", "worker"],
        )
        with c.lock:
            for run_id, run in sorted(c.runs.items()):
                live = run.live(now)
                sizes = run.batch_sizes(now)
                snapshot = run.snapshot(now)
                global_batch.add_metric([run_id], sum(sizes.values()))
                ratio = batch_size_mismatch_ratio(list(sizes.values()))
                mismatch.add_metric([run_id], ratio if math.isfinite(ratio) else math.inf)
                divergence.add_metric([run_id], snapshot.divergence)
                workers.add_metric([run_id, "live"], len(live))
                workers.add_metric([run_id, "stale"], len(run.workers) - len(live))
                reports.add_metric([run_id], run.reports)
                for layer, value in sorted(snapshot.layer_drift().items()):
                    layer_drift.add_metric([run_id, layer], value)
                advice = run.recommendations(now=now) if sum(sizes.values()) >= len(sizes) else {}
                for worker_id, record in sorted(run.workers.items()):
                    batch.add_metric([run_id, worker_id], record.report.batch_size)
                    worker_drift.add_metric([run_id, worker_id], snapshot.worker_drift(worker_id)[0])
                    last.add_metric([run_id, worker_id], record.last_seen)
                    if worker_id in advice:
                        recommended.add_metric([run_id, worker_id], advice[worker_id])
            for reason in sorted(set(REJECTION_REASONS) | set(c.rejected)):
                rejected.add_metric([reason], c.rejected[reason])
        yield from (batch, global_batch, mismatch, worker_drift, layer_drift, divergence, last, workers,
                    reports, rejected, recommended)  # fmt: skip
