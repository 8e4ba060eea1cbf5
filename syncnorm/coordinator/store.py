"""Durable coordinator state: one SQLite database (WAL) in ``--state-dir``.

The database holds the state itself, not a log: per run its counters, its
layer layout, cumulative moments and EMAs (flat per-channel arrays), per worker
the latest report, and the rejection counts.  Every accepted report is one transaction, committed before
the worker is answered, so a report that was acknowledged survives a crash
(WAL survives process death with ``synchronous=NORMAL``), and the database
stays the size of the state however long a run is.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from syncnorm.coordinator.state import Layout, RunState, WorkerRecord, parse_report
from syncnorm.coordinator.v1 import coordinator_pb2 as pb
from syncnorm.moments import Moments

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, reports INTEGER, latest_step INTEGER, layout TEXT,
    cumulative_count BLOB, cumulative_mean BLOB, cumulative_m2 BLOB,
    ema_mean BLOB, ema_var BLOB, ema_started BLOB);
CREATE TABLE IF NOT EXISTS workers (
    run_id TEXT, worker_id TEXT, last_seen REAL, report BLOB, PRIMARY KEY (run_id, worker_id));
CREATE TABLE IF NOT EXISTS rejections (reason TEXT PRIMARY KEY, count INTEGER);
"""


def _blob(t: Tensor) -> bytes:
    return t.numpy().tobytes()


def _tensor(b: bytes, dtype: type = np.float64) -> Tensor:
    return torch.from_numpy(np.frombuffer(b, dtype=dtype).copy())


class StateStore:
    """Saves and loads the coordinator's runs; see the module docstring."""

    def __init__(self, state_dir: str | Path) -> None:
        folder = Path(state_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "coordinator.sqlite3"
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        tables = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if tables and version != SCHEMA_VERSION:
            self._db.close()
            raise RuntimeError(
                f"{self.path} was written by another syncnorm version (schema {version}, this one "
                f"reads {SCHEMA_VERSION}); give the coordinator a new --state-dir"
            )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def save_report(self, run: RunState, worker_id: str, message: pb.ReportRequest) -> None:
        """Persist what one accepted report changed in ``run`` (one transaction)."""
        record = run.workers[worker_id]
        c = run.cumulative_moments
        layout = json.dumps([run.layout.names, run.layout.channels])
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run.run_id, run.reports, run.latest_step, layout, _blob(c.count), _blob(c.mean),
                 _blob(c.m2), _blob(run.ema_mean), _blob(run.ema_var), _blob(run.ema_started)),
            )  # fmt: skip
            self._db.execute(
                "INSERT OR REPLACE INTO workers VALUES (?, ?, ?, ?)",
                (run.run_id, worker_id, record.last_seen, message.SerializeToString()),
            )

    def save_rejection(self, reason: str) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO rejections VALUES (?, 1) ON CONFLICT(reason) DO UPDATE SET count = count + 1",
                (reason,),
            )

    def load(self, momentum: float, stale_after_s: float) -> tuple[dict[str, RunState], Counter[str]]:
        runs: dict[str, RunState] = {}
        for row in self._db.execute("SELECT * FROM runs"):
            run_id, reports, latest_step, layout, count, mean, m2, ema_mean, ema_var, started = row
            names, channels = json.loads(layout)
            runs[run_id] = RunState(
                run_id, momentum, stale_after_s, reports=reports, latest_step=latest_step,
                layout=Layout(tuple(names), tuple(channels)),
                cumulative_moments=Moments(_tensor(count), _tensor(mean), _tensor(m2)),
                ema_mean=_tensor(ema_mean), ema_var=_tensor(ema_var), ema_started=_tensor(started, np.bool_),
            )  # fmt: skip
        for run_id, worker_id, last_seen, blob in self._db.execute("SELECT * FROM workers"):
            run = runs[run_id]
            report = parse_report(pb.ReportRequest.FromString(blob))
            run.workers[worker_id] = WorkerRecord.place(report, last_seen, run.layout)
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
