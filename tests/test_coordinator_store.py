"""The SQLite store: a coordinator reloaded from its state dir holds what the live one held."""

from __future__ import annotations

import time

import torch

from syncnorm.coordinator.service import Coordinator
from syncnorm.coordinator.state import OPEN_STEPS, RunState
from syncnorm.coordinator.store import CHECKPOINT_EVERY_S, StateStore
from syncnorm.coordinator.v1.coordinator_pb2 import LayerStats, ReportRequest


def _report(worker: int, step: int, layers: tuple[str, ...]) -> ReportRequest:
    g = torch.Generator().manual_seed(100 * step + worker)
    stats = []
    for i, name in enumerate(layers):
        x = torch.randn(4 + worker, 3 + i, generator=g, dtype=torch.float64) + step
        stats.append(LayerStats(layer=name, count=x.shape[0], mean=x.mean(0).tolist(),
                                var=x.var(0, correction=0).tolist(), running_mean=x.mean(0).tolist(),
                                running_var=x.var(0).tolist()))  # fmt: skip
    return ReportRequest(run_id="run", worker_id=f"w{worker}", step=step, batch_size=4 + worker, layers=stats)


def _same(live: RunState, loaded: RunState) -> None:
    assert (loaded.reports, loaded.latest_step, loaded.folded_through, loaded.layout) == (
        live.reports, live.latest_step, live.folded_through, live.layout
    )  # fmt: skip
    assert sorted(loaded.open_steps) == sorted(live.open_steps)
    assert sorted(loaded.workers) == sorted(live.workers)
    ours, theirs = live.estimates(), loaded.estimates()
    assert ours.cumulative.keys() == theirs.cumulative.keys() and ours.ema.keys() == theirs.ema.keys()
    for name, moments in ours.cumulative.items():
        for field in ("count", "mean", "m2"):
            assert torch.equal(getattr(moments, field), getattr(theirs.cumulative[name], field))
    for name, (mean, var) in ours.ema.items():
        assert torch.equal(mean, theirs.ema[name][0]) and torch.equal(var, theirs.ema[name][1])


def test_a_reloaded_store_holds_the_open_steps_the_estimates_and_a_grown_layout(tmp_path) -> None:
    live = Coordinator(momentum=0.2, stale_after_s=3600, store=StateStore(tmp_path))

    def reloaded() -> RunState:
        return Coordinator(momentum=0.2, stale_after_s=3600, store=StateStore(tmp_path)).run("run")

    for step in range(OPEN_STEPS + 3):  # some steps taken in, the newest open
        for worker in (1, 0) if step % 2 else (0, 1):
            live.report(_report(worker, step, ("bn1",)), now=0.0)
    assert live.run("run").folded_through == 2
    _same(live.run("run"), reloaded())
    # a new layer in an open step: the layout grows, the saved estimates and other open steps
    # keep their old size until they change
    live.report(_report(0, OPEN_STEPS + 2, ("bn1", "bn2")), now=0.0)
    assert live.run("run").folded_through == 2
    _same(live.run("run"), reloaded())
    live.report(_report(1, 0, ("bn1", "bn2")), now=0.0)  # late: straight into the cumulative estimate
    _same(live.run("run"), reloaded())
    assert live.run("run").estimates().cumulative["bn2"].count == 4 + 5


def test_checkpoints_run_in_the_background_and_close_empties_the_wal(tmp_path) -> None:
    store = StateStore(tmp_path)
    coordinator = Coordinator(stale_after_s=3600, store=store)
    database, wal = store.path, store.path.with_name(store.path.name + "-wal")
    empty = database.stat().st_size
    for step in range(3):
        coordinator.report(_report(0, step, ("bn1", "bn2")), now=0.0)
    # commits never checkpoint (wal_autocheckpoint=0): only the background thread moves
    # the reports from the WAL into the database file
    assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    deadline = time.monotonic() + 10 * CHECKPOINT_EVERY_S + 5
    while database.stat().st_size == empty and time.monotonic() < deadline:
        time.sleep(CHECKPOINT_EVERY_S / 2)
    assert database.stat().st_size > empty
    store.close()
    assert not store._checkpointer.is_alive()
    assert not wal.exists() or wal.stat().st_size == 0
    assert Coordinator(stale_after_s=3600, store=StateStore(tmp_path)).run("run").reports == 3
