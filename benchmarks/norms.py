"""Which normalization as the per-worker batch shrinks?  Measured on digits.

Trains the digits CNN (syncnorm/train) on local Gloo workers with per-worker batch
sizes 1, 2, 4 and 8, with each normalization after every convolution:

* ``local``: torch BatchNorm per worker (what plain DDP gives),
* ``sync``: syncnorm's SyncBatchNorm,
* ``switchable``: syncnorm's SyncSwitchableNorm2d (batch branch synchronized),
* ``batch-instance``: syncnorm's SyncBatchInstanceNorm2d (batch branch synchronized),
* ``group``: GroupNorm with 8 groups, and ``layer``: GroupNorm with one group
  (batch-independent: nothing to synchronize),

every configuration with the same seeds, epochs, SGD with momentum and cosine
decay as ``syncnorm train`` (initial learning rate 0.05; GroupNorm 0.01 and layer
norm 0.005, see :data:`LEARNING_RATES`); all runs share one group of worker
processes.  Prints the test accuracy (mean +- sd over seeds) as
a Markdown table, and writes a plot and optionally the raw accuracies.

    python -m benchmarks.norms [--workers 4] [--per-worker 1,2,4,8] [--epochs 2] [--seeds 0,1]
        [--norms local,sync,switchable,group,layer] [--plot benchmarks/results/norms.png] [--json PATH]

About 7 minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from benchmarks.small_batch import finish_plot, mean_sd
from syncnorm.launch import run_local_group
from syncnorm.train.config import NORMS, TrainConfig
from syncnorm.train.loop import train_worker

LABELS = {
    "local": "torch BatchNorm per worker",
    "sync": "syncnorm SyncBatchNorm",
    "switchable": "syncnorm SyncSwitchableNorm2d",
    "batch-instance": "syncnorm SyncBatchInstanceNorm2d",
    "group": "GroupNorm (8 groups)",
    "layer": "GroupNorm (1 group, layer norm)",
}


LEARNING_RATES = {"group": 0.01, "layer": 0.005}
"""Initial learning rates that differ from ``syncnorm train``'s 0.05: GroupNorm and layer
norm do not train at 0.05 on this CNN.  Each is the best of 0.2, 0.05, 0.01, 0.005 and
0.002 for one process, batch 8, 2 epochs, seed 0 (README, "Which normalization")."""


def _train_all(rank: int, world_size: int, configs: list[TrainConfig]) -> list[tuple[float, float]]:
    """Every run in one process group: workers start (and import torch) once."""
    measured = []
    for config in configs:
        result = train_worker(config, rank, world_size)
        measured.append((result.test_accuracy, result.seconds))
        if rank == 0:
            print(
                f"# {config.norm:>14} {world_size} x {config.batch_sizes[0]:<2} seed {config.seed}: "
                f"{result.test_accuracy:.3f} ({result.seconds:.0f} s)", flush=True,
            )  # fmt: skip
    return measured


def measure(
    norms: list[str], epochs: int, seeds: list[int], workers: int, per_worker: tuple[int, ...]
) -> list[dict]:
    base = TrainConfig(epochs=epochs, device="cpu", progress=False)
    runs = [(norm, batch) for batch in per_worker for norm in norms]
    configs = [
        replace(base, norm=norm, batch_sizes=(batch,), seed=seed, lr=LEARNING_RATES.get(norm, base.lr))
        for norm, batch in runs
        for seed in seeds
    ]
    results = iter(run_local_group(_train_all, workers, configs, timeout_s=3600)[0])
    rows = []
    for norm, batch in runs:
        measured = [next(results) for _ in seeds]
        rows.append(
            {"norm": norm, "workers": workers, "batch_per_worker": batch,
             "lr": LEARNING_RATES.get(norm, base.lr), "accuracies": [a for a, _ in measured],
             "train_seconds": [round(t, 1) for _, t in measured]}
        )  # fmt: skip
    return rows


def table(rows: list[dict], epochs: int, seeds: list[int]) -> str:
    """One row per normalization, one column per batch size per worker."""
    sizes = sorted({r["batch_per_worker"] for r in rows})
    workers = rows[0]["workers"]
    lines = [
        f"Test accuracy on digits, {workers} workers, {epochs} epochs, seeds {','.join(map(str, seeds))} "
        "(mean ± sd); initial learning rate 0.05, GroupNorm 0.01, layer norm 0.005",
        "",
        "| norm | " + " | ".join(f"{workers} x {b}" for b in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for norm in dict.fromkeys(r["norm"] for r in rows):
        cells = []
        for b in sizes:
            row = next((r for r in rows if r["norm"] == norm and r["batch_per_worker"] == b), None)
            cells.append("" if row is None else "{:.3f} ± {:.3f}".format(*mean_sd(row["accuracies"])))
        lines.append(f"| {LABELS.get(norm, norm)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against batch size per worker, one line per normalization."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for norm in dict.fromkeys(r["norm"] for r in rows):
        points = [r for r in rows if r["norm"] == norm]
        xs = [r["batch_per_worker"] for r in points]
        stats = [mean_sd(r["accuracies"]) for r in points]
        ax.errorbar(
            xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
            label=LABELS.get(norm, norm),
        )  # fmt: skip
    sizes = sorted({r["batch_per_worker"] for r in rows})
    title = "digits CNN: normalization against per-worker batch size"
    finish_plot(fig, ax, sizes, rows[0]["workers"], title, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--per-worker", default="1,2,4,8", help="batch sizes per worker")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument(
        "--norms", default="local,sync,switchable,group,layer", help=f"from {','.join(NORMS)}"
    )
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/results/norms.png"))
    parser.add_argument("--json", type=Path, help="also write the raw accuracies here")
    args = parser.parse_args()
    norms = args.norms.split(",")
    unknown = sorted(set(norms) - set(NORMS))
    if unknown:
        parser.error(f"unknown norms {unknown}; choose from {', '.join(NORMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    per_worker = tuple(int(b) for b in args.per_worker.split(","))
    rows = measure(norms, args.epochs, seeds, args.workers, per_worker)
    print(table(rows, args.epochs, seeds))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    plot(rows, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
