"""What a training run is asked to do, and what it reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Norm = Literal["sync", "local", "switchable", "batch-instance", "group", "layer"]

NORMS: tuple[str, ...] = ("sync", "local", "switchable", "batch-instance", "group", "layer")
"""``syncnorm train --norm`` choices; see :class:`TrainConfig`."""

SYNCHRONIZED_NORMS = frozenset({"sync", "switchable", "batch-instance"})
"""Norms whose batch statistics span every worker's batch."""


@dataclass(frozen=True)
class TrainConfig:
    """Args:
    batch_sizes: one batch size per worker (a single value is used for all).
    epochs: passes over the training split.
    lr: initial SGD learning rate (momentum 0.9, weight decay 5e-4), decayed to
        zero over the run on a cosine.
    seed: seeds the split, the initial weights and the batch order.
    norm: ``"sync"`` (syncnorm.SyncBatchNorm, exact global-batch gradients),
        ``"local"`` (plain torch BatchNorm per worker, DDP's equal-weight average),
        ``"switchable"`` / ``"batch-instance"`` (syncnorm.SyncSwitchableNorm2d /
        SyncBatchInstanceNorm2d, batch branch synchronized, exact gradients), or the
        batch-independent ``"group"`` (GroupNorm, 8 groups) and ``"layer"``
        (GroupNorm with one group: layer norm over C, H, W with per-channel affine).
    checkpoint: where rank 0 saves the state_dict (loads into the same model
        built with ``torch.nn.BatchNorm2d``).
    precise_bn_batches: recompute running statistics over this many batches
        per worker with :func:`syncnorm.precise_bn` before testing (0: off).
    coordinator, report_every, run_id: reporting to a syncnorm coordinator;
    coordinator_token_file, coordinator_ca: its bearer token and TLS CA (PEM files).
    device: ``"cpu"``, ``"cuda"``, or ``"auto"`` (CUDA when available).
    dtype: ``"float32"`` or ``"float64"`` for the weights and inputs.
    input_shift: ``(rank, shift)``: worker ``rank`` adds ``shift`` to its input
        pixels (which lie in [0, 1]): a planted data problem, for watching the
        coordinator's drift metric and alert respond.
    progress: show a progress bar on rank 0.
    return_state: rank 0's result carries the final state_dict (for comparisons).
    """

    batch_sizes: tuple[int, ...] = (32,)
    epochs: int = 5
    lr: float = 0.05
    seed: int = 0
    norm: Norm = "sync"
    checkpoint: str | None = None
    precise_bn_batches: int = 0
    coordinator: str | None = None
    report_every: int = 10
    run_id: str = "syncnorm"
    coordinator_token_file: str | None = None
    coordinator_ca: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    input_shift: tuple[int, float] | None = None
    progress: bool = True
    return_state: bool = False

    def sizes_for(self, world_size: int) -> tuple[int, ...]:
        """Per-worker batch sizes for ``world_size`` workers, validated."""
        sizes = self.batch_sizes * world_size if len(self.batch_sizes) == 1 else self.batch_sizes
        if len(sizes) != world_size:
            raise ValueError(
                f"--batch-sizes gives {len(sizes)} sizes for {world_size} worker(s): "
                "give one per worker or a single size for all"
            )
        if min(sizes) < 0 or sum(sizes) < 2:
            raise ValueError(f"batch sizes must be >= 0 and add up to at least 2, got {list(sizes)}")
        if self.input_shift is not None and not 0 <= self.input_shift[0] < world_size:
            rank = self.input_shift[0]
            raise ValueError(f"--input-shift names rank {rank}, not one of {world_size} worker(s)")
        if self.norm not in NORMS:
            raise ValueError(f"--norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.norm not in SYNCHRONIZED_NORMS and min(sizes) < 1:
            raise ValueError(
                f"--norm {self.norm} needs every worker's batch size >= 1 "
                "(only the synchronized norms train on an empty batch)"
            )
        return sizes


@dataclass
class TrainResult:
    """What one worker saw; every worker computes the same test accuracy."""

    rank: int
    world_size: int
    batch_sizes: tuple[int, ...]
    norm: str
    test_accuracy: float
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    state_dict: dict[str, Any] | None = None  # rank 0's final model, when asked for
