"""Does synchronized BN rescue small per-worker batches?  Measured on digits.

Trains the digits CNN (syncnorm/train) on 8 local Gloo workers with per-worker
batch sizes 1, 2, 4 and 8, with plain per-worker BatchNorm ("local") and with
syncnorm's SyncBatchNorm ("sync"), plus one process with the 8 x 2 = 16 global
batch (the same steps as 8 x 2); every configuration with seeds 0, 1, 2 and the
same epochs.  Prints the
test accuracy (mean +- sd over seeds) as a Markdown table and writes a plot.

    python -m benchmarks.small_batch [--epochs 3] [--seeds 0,1,2] [--plot benchmarks/results/small_batch.png]

Slow on 2 cores (8 processes share them): about 15 minutes.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

from syncnorm.launch import run_local_group
from syncnorm.train.config import TrainConfig
from syncnorm.train.loop import train_rank, train_worker

WORKERS = 8
PER_WORKER = (1, 2, 4, 8)
LABELS = {"local": "torch BatchNorm per worker", "sync": "syncnorm SyncBatchNorm"}


def _accuracy(config: TrainConfig, workers: int) -> float:
    if workers == 1:
        return train_worker(config).test_accuracy
    return run_local_group(train_rank, workers, config, timeout_s=1800)[0].test_accuracy


def measure(epochs: int, seeds: list[int], workers: int, per_worker: tuple[int, ...]) -> list[dict]:
    base = TrainConfig(epochs=epochs, device="cpu", progress=False)
    rows = []
    runs = [(norm, workers, b) for b in per_worker for norm in ("local", "sync")]
    runs.append(("one process", 1, workers * 2))
    for norm, count, batch in runs:
        config = replace(base, norm="local" if norm == "one process" else norm, batch_sizes=(batch,))
        accuracies = [_accuracy(replace(config, seed=seed), count) for seed in seeds]
        rows.append({"norm": norm, "workers": count, "batch_per_worker": batch, "accuracies": accuracies})
        print(f"# {norm:>11} {count} x {batch:<2}: {accuracies}", flush=True)
    return rows


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(rows: list[dict], epochs: int, seeds: list[int]) -> str:
    lines = [
        f"Test accuracy on digits, {epochs} epochs, seeds {','.join(map(str, seeds))} (mean ± sd)",
        "",
        "| norm | workers x batch per worker | global batch | test accuracy |",
        "|---|---|---|---|",
    ]
    for r in rows:
        mean, sd = mean_sd(r["accuracies"])
        norm = LABELS.get(r["norm"], r["norm"])
        lines.append(
            f"| {norm} | {r['workers']} x {r['batch_per_worker']} | {r['workers'] * r['batch_per_worker']} "
            f"| {mean:.3f} ± {sd:.3f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against batch size per worker, local vs sync, the single process as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for norm in ("local", "sync"):
        label = LABELS[norm]
        points = [r for r in rows if r["norm"] == norm]
        xs = [r["batch_per_worker"] for r in points]
        stats = [mean_sd(r["accuracies"]) for r in points]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=label)
    single = next(r for r in rows if r["norm"] == "one process")
    workers = next(r["workers"] for r in rows if r["norm"] == "sync")
    ax.axhline(
        mean_sd(single["accuracies"])[0], color="gray", linestyle="--",
        label=f"one process, batch {single['batch_per_worker']}",
    )  # fmt: skip
    sizes = sorted({r["batch_per_worker"] for r in rows if r["norm"] == "sync"})
    finish_plot(fig, ax, sizes, workers, "digits CNN: BN statistics over small per-worker batches", path)


def finish_plot(fig: Any, ax: Any, sizes: list[int], workers: int, title: str, path: Path) -> None:
    """Label an accuracy-against-per-worker-batch-size plot and save it to ``path``."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel(f"batch size per worker ({workers} workers)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/results/small_batch.png"))
    parser.add_argument("--json", type=Path, help="also write the raw accuracies here")
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--per-worker", default=",".join(map(str, PER_WORKER)), help="batch sizes per worker")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    per_worker = tuple(int(b) for b in args.per_worker.split(","))
    rows = measure(args.epochs, seeds, args.workers, per_worker)
    print(table(rows, args.epochs, seeds))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    plot(rows, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
