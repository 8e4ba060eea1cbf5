"""Durable coordinator state: one SQLite database (WAL) in ``--state-dir``.

The database holds the state itself, not a log: per run its counters, per
worker the latest report, per layer the cumulative moments and EMAs, and the
rejection counts.  Every accepted report is one transaction, committed before
the worker is answered, so a report that was acknowledged survives a crash
(WAL survives process death with ``synchronous=NORMAL``), and the database
stays the size of the state however long a run is.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from syncnorm.coordinator.state import LayerGlobal, RunState, WorkerRecord, parse_report
from syncnorm.coordinator.v1 import coordinator_pb2 as pb
from syncnorm.moments import Moments

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, reports INTEGER, latest_step INTEGER);
CREATE TABLE IF NOT EXISTS workers (
    run_id TEXT, worker_id TEXT, last_seen REAL, report BLOB, PRIMARY KEY (run_id, worker_id));
CREATE TABLE IF NOT EXISTS layers (
    run_id TEXT, layer TEXT, channels INTEGER, count REAL, mean BLOB, m2 BLOB, ema_mean BLOB,
    ema_var BLOB, PRIMARY KEY (run_id, layer));
CREATE TABLE IF NOT EXISTS rejections (reason TEXT PRIMARY KEY, count INTEGER);
"""


def _blob(t: Tensor | None) -> bytes | None:
    return None if t is None else t.double().numpy().tobytes()


def _tensor(b: bytes | None) -> Tensor | None:
    return None if b is None else torch.from_numpy(np.frombuffer(b, dtype=np.float64).copy())


class StateStore:
    """Saves and loads the coordinator's runs; see the module docstring."""

    def __init__(self, state_dir: str | Path) -> None:
        folder = Path(state_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "coordinator.sqlite3"
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def save_report(self, run: RunState, worker_id: str, message: pb.ReportRequest) -> None:
        """Persist what one accepted report changed in ``run`` (one transaction)."""
        record = run.workers[worker_id]
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?)", (run.run_id, run.reports, run.latest_step)
            )
            self._db.execute(
                "INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?)",
                (run.run_id, worker_id, record.last_seen, message.SerializeToString()),
            )
            for name, layer in run.layers.items():
                c = layer.cumulative
                self._db.execute(
                    "INSERT OR REPLACE INTO layers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (run.run_id, name, layer.channels, None if c is None else float(c.count),
                     _blob(None if c is None else c.mean), _blob(None if c is None else c.m2),
                     _blob(layer.ema_mean), _blob(layer.ema_var)),
                )  # fmt: skip

    def save_rejection(self, reason: str) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO rejections VALUES (?, 1) ON CONFLICT(reason) DO UPDATE SET count = count + 1",
                (reason,),
            )

    def load(self, momentum: float, stale_after_s: float) -> tuple[dict[str, RunState], Counter[str]]:
        runs: dict[str, RunState] = {}
        for run_id, reports, latest_step in self._db.execute("SELECT * FROM runs"):
            runs[run_id] = RunState(run_id, momentum, stale_after_s, reports=reports, latest_step=latest_step)
        for run_id, worker_id, last_seen, blob in self._db.execute("SELECT * FROM workers"):
            report = parse_report(pb.ReportRequest.FromString(blob))
            runs[run_id].workers[worker_id] = WorkerRecord(report, last_seen)
        for run_id, name, channels, count, mean, m2, ema_mean, ema_var in self._db.execute(
            "SELECT * FROM layers"
        ):
            cumulative = None
            if count is not None:
                cumulative = Moments(torch.tensor(count, dtype=torch.float64), _tensor(mean), _tensor(m2))  # type: ignore[arg-type]
            runs[run_id].layers[name] = LayerGlobal(channels, cumulative, _tensor(ema_mean), _tensor(ema_var))
        rejected = Counter(dict(self._db.execute("SELECT reason, count FROM rejections")))
        return runs, rejected

    def _transaction(self):  # noqa: ANN202
        return _Transaction(self._db)

    def close(self) -> None:
        self._db.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
