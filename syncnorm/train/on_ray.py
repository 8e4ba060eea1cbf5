"""`syncnorm train --ray`: the same training loop under Ray Train's TorchTrainer.

With ``transport="torch"`` SyncBN uses the process group Ray Train sets up
(Gloo on CPU, NCCL on GPU).  With ``transport="actor"`` SyncBN statistics go
through a :class:`~syncnorm.transports.ray_actor.StatsAggregator` actor instead
(DDP still averages gradients over Ray's process group).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict
from typing import Any, Literal

import torch

from syncnorm.train.config import TrainConfig, TrainResult
from syncnorm.train.loop import train_worker

Transport = Literal["torch", "actor"]


def _loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    from syncnorm.transports.ray_actor import ActorReducer

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    config: TrainConfig = loop_config["config"]
    reducer = None
    if loop_config["aggregator"] is not None:
        reducer = ActorReducer(loop_config["aggregator"], rank, world_size, run_id=config.run_id)
    result = train_worker(config, rank, world_size, reducer=reducer)
    metrics = {k: v for k, v in asdict(result).items() if k not in ("losses", "state_dict")}
    metrics["final_loss"] = result.losses[-1] if result.losses else float("nan")
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            torch.save(result.state_dict, os.path.join(folder, "model.pt"))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def train_on_ray(
    config: TrainConfig,
    num_workers: int,
    transport: Transport = "torch",
    address: str | None = None,
    storage_path: str | None = None,
) -> TrainResult:
    """Run :func:`train_worker` on ``num_workers`` Ray Train workers; rank 0's result.

    Without ``address`` (and no Ray running in this process) a local Ray starts
    here, bound to 127.0.0.1, with as many CPUs as the machine has (at least one
    per worker); with ``address`` the run joins that cluster.
    """
    if not address:
        # A local single-node Ray binds and connects on 127.0.0.1 only; Ray otherwise
        # advertises the host's routable address even for local use.  Ray reads this
        # when imported, so it has to be set first.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from syncnorm.transports.ray_actor import start_aggregator

    if transport not in ("torch", "actor"):
        raise ValueError(f"transport must be 'torch' or 'actor', got {transport!r}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, num_workers), include_dashboard=False)
    use_gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    aggregator = start_aggregator() if transport == "actor" else None
    trainer = TorchTrainer(
        _loop_per_worker,
        train_loop_config={"config": config, "aggregator": aggregator},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=600),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=f"syncnorm-{config.run_id}",
            storage_path=storage_path or tempfile.mkdtemp(prefix="syncnorm-ray-"),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    metrics = result.metrics or {}
    state = None
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, "model.pt"))
    return TrainResult(
        rank=0, world_size=num_workers, batch_sizes=tuple(metrics["batch_sizes"]), norm=metrics["norm"],
        test_accuracy=metrics["test_accuracy"], steps=metrics["steps"], seconds=metrics["seconds"],
        losses=[metrics["final_loss"]], state_dict=state,
    )  # fmt: skip
