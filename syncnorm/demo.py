"""``syncnorm demo``: SyncBatchNorm on local Gloo workers with uneven batches,
checked against torch's BatchNorm2d on the concatenated global batch."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from syncnorm.convert import convert_sync_batchnorm
from syncnorm.launch import run_local_group


@dataclass(frozen=True)
class DemoConfig:
    """Args:
    batch_sizes: one per worker; uneven on purpose, zeros allowed.
    steps: forward + backward iterations, each on a fresh batch.
    channels: channels of the batch norm layers.
    """

    batch_sizes: tuple[int, ...] = (3, 13)
    steps: int = 20
    channels: int = 8


def _model(channels: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
    )  # fmt: skip


def _global_batch(step: int, total: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global input and the gradient of the loss w.r.t. the model's output."""
    g = torch.Generator().manual_seed(step)
    return torch.randn(total, 3, 8, 8, generator=g) * 3 + 1, torch.randn(total, channels, 8, 8, generator=g)


def _run(model: nn.Module, config: DemoConfig, rank: int | None) -> dict[str, torch.Tensor]:
    """Train ``model`` on rank ``rank``'s slices (all of them when None); return what it produced."""
    sizes = config.batch_sizes
    lo = sum(sizes[:rank]) if rank is not None else 0
    hi = lo + sizes[rank] if rank is not None else sum(sizes)
    outputs, grads = [], []
    for step in range(config.steps):
        x, dy = _global_batch(step, sum(sizes), config.channels)
        x = x[lo:hi].requires_grad_(True)
        y = model(x)
        y.backward(dy[lo:hi])
        outputs.append(y.detach())
        grads.append(x.grad)
    return {
        "outputs": torch.cat(outputs),
        "input gradients": torch.cat(grads),
        "running_mean": torch.cat([m.running_mean for m in model.modules() if hasattr(m, "running_mean")]),
        "running_var": torch.cat([m.running_var for m in model.modules() if hasattr(m, "running_var")]),
    }


def _worker(rank: int, world_size: int, config: DemoConfig) -> tuple[dict[str, torch.Tensor], float]:
    model = convert_sync_batchnorm(_model(config.channels))
    start = time.perf_counter()
    produced = _run(model, config, rank)
    return produced, (time.perf_counter() - start) / config.steps


def run_demo(config: DemoConfig) -> str:
    """Run the demo and return its report."""
    world = len(config.batch_sizes)
    results = run_local_group(_worker, world, config, timeout_s=300)
    reference = _run(_model(config.channels), config, None)
    local = [_run(_model(config.channels), config, r) for r in range(world)]

    def gap(key: str, per_rank: list[dict[str, torch.Tensor]]) -> float:
        if key.startswith("running"):
            return max(float((p[key] - reference[key]).abs().max()) for p in per_rank)
        mine = torch.cat([_by_step(p[key], config, r) for r, p in enumerate(per_rank)], dim=1)
        return float((mine - _by_step(reference[key], config, None)).abs().max())

    synced = [r[0] for r in results]
    lines = [
        f"syncnorm demo: {world} Gloo workers on 127.0.0.1, batch sizes "
        f"{', '.join(map(str, config.batch_sizes))}, {config.steps} steps, "
        f"{config.channels}-channel batch norm layers",
        "",
        f"{'max |difference| to torch BatchNorm2d on the global batch':<58}{'syncnorm':>12}{'local BN':>12}",
    ]
    for key in ("outputs", "input gradients", "running_mean", "running_var"):
        lines.append(f"{'  ' + key:<58}{gap(key, synced):>12.2e}{gap(key, local):>12.2e}")
    step_ms = 1e3 * max(r[1] for r in results)
    lines += ["", f"syncnorm step time (forward + backward, slowest worker): {step_ms:.1f} ms"]
    return "\n".join(lines)


def _by_step(t: torch.Tensor, config: DemoConfig, rank: int | None) -> torch.Tensor:
    """Rows concatenated over steps, reshaped to (steps, rows of ``rank`` or of all, ...)."""
    rows = sum(config.batch_sizes) if rank is None else config.batch_sizes[rank]
    return t.reshape(config.steps, rows, *t.shape[1:])
