"""Reading from a coordinator: the consensus statistics and the workers' table."""

from __future__ import annotations

import time
from typing import Literal

import grpc
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from syncnorm.coordinator.security import call_metadata, open_channel
from syncnorm.coordinator.v1 import coordinator_pb2 as pb
from syncnorm.coordinator.v1 import coordinator_pb2_grpc as pb_grpc

DEADLINE_S = 10.0


def _stub(address: str, root_certificates: bytes | None) -> tuple[grpc.Channel, pb_grpc.CoordinatorStub]:
    channel = open_channel(address, root_certificates)
    return channel, pb_grpc.CoordinatorStub(channel)


@torch.no_grad()
def load_global_stats(
    model: nn.Module,
    coordinator: str,
    run: str,
    estimate: Literal["cumulative", "ema"] = "cumulative",
    deadline_s: float = DEADLINE_S,
    token: str | None = None,
    root_certificates: bytes | None = None,
) -> list[str]:
    """Load a run's consensus running statistics into ``model``'s batch norm layers.

    Layers are matched by qualified name (SyncBatchNorm's ``layer_name`` or the
    module path), so a plain-BN copy of the model works too.  ``cumulative`` is
    the exact population statistics of every reported batch; ``ema`` the moving
    average of the per-step global batch statistics.  Returns the names loaded.
    Raises ``KeyError`` naming layers the coordinator knows but the model lacks.
    ``token`` and ``root_certificates`` (PEM CA) for a coordinator that wants them.
    """
    channel, stub = _stub(coordinator, root_certificates)
    with channel:
        answer = stub.GetGlobalStats(
            pb.GetGlobalStatsRequest(run_id=run), timeout=deadline_s, metadata=call_metadata(token)
        )
    layers = {
        getattr(m, "layer_name", "") or name: m
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None
    }
    missing = [layer.layer for layer in answer.layers if layer.layer not in layers]
    if missing:
        raise KeyError(f"the model has no batch norm layers named {missing}")
    loaded = []
    for layer in answer.layers:
        mean = layer.cumulative_mean if estimate == "cumulative" else layer.ema_mean
        var = layer.cumulative_var if estimate == "cumulative" else layer.ema_var
        if not mean:
            continue
        module = layers[layer.layer]
        module.running_mean.copy_(torch.tensor(list(mean), dtype=module.running_mean.dtype))
        module.running_var.copy_(torch.tensor(list(var), dtype=module.running_var.dtype))
        loaded.append(layer.layer)
    return loaded


def status_table(
    coordinator: str,
    run: str,
    deadline_s: float = DEADLINE_S,
    token: str | None = None,
    root_certificates: bytes | None = None,
) -> str:
    """The workers of ``run`` as a text table (what ``syncnorm status`` prints)."""
    channel, stub = _stub(coordinator, root_certificates)
    with channel:
        answer = stub.ListWorkers(
            pb.ListWorkersRequest(run_id=run), timeout=deadline_s, metadata=call_metadata(token)
        )
    now = time.time()
    lines = [
        f"run {run!r}: global batch {answer.global_batch_size}, batch-size mismatch "
        f"{answer.batch_size_mismatch_ratio:.2f}, "
        f"running-stats divergence {answer.running_stats_divergence:.3f}",
        "",
        f"{'worker':<16}{'device':<8}{'step':>8}{'batch':>7}{'share':>8}{'drift':>8}"
        f"{'last report':>13}{'recommended':>13}",
    ]
    for w in answer.workers:
        age = f"{now - w.last_report_unix_seconds:.0f}s ago" + (" (stale)" if w.stale else "")
        lines.append(
            f"{w.worker_id:<16}{w.device_kind:<8}{w.step:>8}{w.batch_size:>7}{w.batch_share:>8.1%}"
            f"{w.stats_drift:>8.2f}{age:>13}{w.recommended_batch_size:>13}"
        )
    return "\n".join(lines)
