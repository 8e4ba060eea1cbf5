"""Durable coordinator state: one SQLite database (WAL) in ``--state-dir``.

Per run the database holds its counters and layer layout, its cumulative
moments and EMA (flat per-channel arrays, written when they change: once per
step), and the reports it still needs: those of the open steps and each
worker's latest.  A restart replays those reports (``RunState.replay``) to
rebuild the open steps and the workers.  Every accepted report is one
transaction, committed before the worker is answered, so a report that was
acknowledged survives a crash (WAL survives process death with
``synchronous=NORMAL``), and the database stays the size of the state however
long a run is.  A report costs one write of its own bytes.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from syncnorm.coordinator.layout import Layout
from syncnorm.coordinator.report import parse_report
from syncnorm.coordinator.state import RunState
from syncnorm.coordinator.v1 import coordinator_pb2 as pb
from syncnorm.moments import Moments

log = logging.getLogger(__name__)

CHECKPOINT_EVERY_S = 0.25
"""How often the background thread moves committed WAL pages into the database."""

SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, reports INTEGER, latest_step INTEGER, layout TEXT, folded_through INTEGER);
CREATE TABLE IF NOT EXISTS estimates (
    run_id TEXT PRIMARY KEY, cumulative_count BLOB, cumulative_mean BLOB, cumulative_m2 BLOB,
    ema_mean BLOB, ema_var BLOB, ema_started BLOB);
CREATE TABLE IF NOT EXISTS reports (
    run_id TEXT, seq INTEGER, worker_id TEXT, step INTEGER, last_seen REAL, report BLOB,
    PRIMARY KEY (run_id, seq));
CREATE TABLE IF NOT EXISTS rejections (reason TEXT PRIMARY KEY, count INTEGER);
"""


def _blob(t: Tensor) -> bytes:
    return t.numpy().tobytes()


def _tensor(b: bytes, dtype: type = np.float64, size: int | None = None) -> Tensor:
    """The array in ``b``; zero-padded to ``size`` values if given."""
    values = np.frombuffer(b, dtype=dtype)
    out = np.zeros(size if size is not None else len(values), dtype=dtype)
    out[: len(values)] = values
    return torch.from_numpy(out)


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
        # Large pages: a report's blobs (hundreds of kB) write ~2.5x faster than in 4 kB
        # overflow-page chains.  Takes effect for a new database only, before WAL.
        self._db.execute("PRAGMA page_size=65536")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        # Checkpoints (copying the WAL into the database, and its fsync) run on a thread of
        # their own, not inside the commit of whichever report crosses the WAL's limit.
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._stop = threading.Event()
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="syncnorm-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            while not self._stop.wait(CHECKPOINT_EVERY_S):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")  # never waits for the writer
                except sqlite3.Error as error:  # the next round tries again; commits are unaffected
                    log.warning("WAL checkpoint of %s failed: %s", self.path, error)
        finally:
            db.close()

    def save_report(
        self, run: RunState, worker_id: str, message: pb.ReportRequest, estimates_changed: bool = True
    ) -> None:
        """Persist what one accepted report changed in ``run`` (one transaction): the
        run's counters, the report, and if ``estimates_changed`` (see
        ``RunState.apply``) the cumulative moments and EMA, dropping the reports that
        are neither in an open step nor some worker's latest."""
        layout = json.dumps([run.layout.names, run.layout.channels])
        last_seen = run.workers[worker_id].last_seen
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?)",
                (run.run_id, run.reports, run.latest_step, layout, run.folded_through),
            )
            self._db.execute(
                "INSERT INTO reports VALUES (?, ?, ?, ?, ?, ?)",
                (run.run_id, run.reports, worker_id, message.step, last_seen, message.SerializeToString()),
            )
            if not estimates_changed:
                return
            c = run.cumulative_moments
            self._db.execute(
                "INSERT OR REPLACE INTO estimates VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run.run_id, _blob(c.count), _blob(c.mean), _blob(c.m2), _blob(run.ema_mean),
                 _blob(run.ema_var), _blob(run.ema_started)),
            )  # fmt: skip
            self._db.execute(
                "DELETE FROM reports WHERE run_id = ?1 AND step <= ?2 AND seq NOT IN "
                "(SELECT max(seq) FROM reports WHERE run_id = ?1 GROUP BY worker_id)",
                (run.run_id, run.folded_through),
            )

    def save_rejection(self, reason: str) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO rejections VALUES (?, 1) ON CONFLICT(reason) DO UPDATE SET count = count + 1",
                (reason,),
            )

    def load(self, momentum: float, stale_after_s: float) -> tuple[dict[str, RunState], Counter[str]]:
        runs: dict[str, RunState] = {}
        for run_id, reports, latest_step, layout, folded in self._db.execute("SELECT * FROM runs"):
            names, channels = json.loads(layout)
            runs[run_id] = RunState(run_id, momentum, stale_after_s, reports=reports, latest_step=latest_step,
                                    folded_through=folded)  # fmt: skip
            runs[run_id].grow(Layout(tuple(names), tuple(channels)))  # empty estimates of its size
        # Estimates were saved when they last changed: the layout may have grown since.
        for row in self._db.execute("SELECT * FROM estimates"):
            run_id, count, mean, m2, ema_mean, ema_var, started = row
            run = runs[run_id]
            size, layers = run.layout.size, len(run.layout.names)
            run.cumulative_moments = Moments(*(_tensor(b, size=size) for b in (count, mean, m2)))
            run.ema_mean, run.ema_var = _tensor(ema_mean, size=size), _tensor(ema_var, size=size)
            run.ema_started = _tensor(started, np.bool_, size=layers)
        rows = self._db.execute("SELECT run_id, last_seen, report FROM reports ORDER BY run_id, seq")
        for run_id, last_seen, blob in rows:
            runs[run_id].replay(parse_report(pb.ReportRequest.FromString(blob)), last_seen)
        rejected = Counter(dict(self._db.execute("SELECT reason, count FROM rejections")))
        return runs, rejected

    def _transaction(self):  # noqa: ANN202
        return _Transaction(self._db)

    def close(self) -> None:
        self._stop.set()
        self._checkpointer.join()
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._db.close()


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
