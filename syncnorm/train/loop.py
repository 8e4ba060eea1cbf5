"""One worker's training loop; the process group, if any, is already initialized."""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from syncnorm.convert import convert_sync_batchnorm, name_layers
from syncnorm.norms import clip_rho_after_steps
from syncnorm.precise_bn import precise_bn
from syncnorm.train.config import SYNCHRONIZED_NORMS, TrainConfig, TrainResult
from syncnorm.train.data import Digits, load_digits, steps_per_epoch, worker_batch
from syncnorm.train.model import digits_cnn, norm_layer
from syncnorm.transports.base import StatsReducer
from syncnorm.uneven import GlobalBatchMean


def resolve_device(name: str, rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch sees no CUDA device")
        return torch.device("cuda", rank % torch.cuda.device_count())
    if name != "cpu":
        raise ValueError(f"--device must be cpu, cuda or auto, got {name!r}")
    return torch.device("cpu")


@torch.no_grad()
def test_accuracy(model: nn.Module, data: Digits, device: torch.device, dtype: torch.dtype) -> float:
    """Accuracy on the held-out split, in eval mode (running statistics, no communication)."""
    was_training = model.training
    model.eval()
    predicted = model(data.test_x.to(device=device, dtype=dtype)).argmax(1).cpu()
    model.train(was_training)
    return float((predicted == data.test_y).float().mean())


def train_worker(
    config: TrainConfig, rank: int = 0, world_size: int = 1, reducer: StatsReducer | None = None
) -> TrainResult:
    """Train the digits CNN as worker ``rank`` of ``world_size`` and test it.

    ``reducer``: the SyncBN transport (default: the torch.distributed group);
    gradients are averaged by DDP over the default process group either way.
    """
    sizes = config.sizes_for(world_size)
    device = resolve_device(config.device, rank)
    data = load_digits(config.seed)
    model: nn.Module = digits_cnn(norm_layer(config.norm), seed=config.seed)
    if config.norm == "sync":
        model = convert_sync_batchnorm(model, reducer=reducer)
    elif config.norm in SYNCHRONIZED_NORMS:
        for layer in model.modules():
            if hasattr(layer, "active_reducer"):
                layer.reducer = reducer
        name_layers(model)
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(config.dtype)
    if dtype is None:
        raise ValueError(f"--dtype must be float32 or float64, got {config.dtype!r}")
    model.to(device=device, dtype=dtype)
    distributed = world_size > 1
    trained = DistributedDataParallel(model) if distributed else model
    global_mean = GlobalBatchMean(trained) if config.norm in SYNCHRONIZED_NORMS else None
    optimizer = torch.optim.SGD(trained.parameters(), lr=config.lr, momentum=0.9, weight_decay=5e-4)
    if config.norm == "batch-instance":
        clip_rho_after_steps(optimizer, model)  # rho stays in [0, 1], as in the paper
    steps = steps_per_epoch(len(data.train_y), sizes)
    if steps == 0:
        raise ValueError(
            f"the global batch of {sum(sizes)} is larger than the {len(data.train_y)} training images"
        )
    reporter = None
    if config.coordinator:
        if config.norm != "sync":
            raise ValueError("--coordinator reports SyncBN statistics: use it with --norm sync")
        from syncnorm.coordinator.reporter import StatsReporter
        from syncnorm.coordinator.security import read_bytes, read_token

        reporter = StatsReporter(
            model, config.coordinator, config.run_id, f"rank-{rank}", report_every=config.report_every,
            token=read_token(config.coordinator_token_file),
            root_certificates=read_bytes(config.coordinator_ca),
        )  # fmt: skip

    # Cosine decay to zero: the final weights are not one noisy iterate of a constant-lr walk.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps)
    progress = _progress(config, rank, config.epochs * steps)
    losses: list[float] = []
    started = time.perf_counter()
    for epoch in range(config.epochs):
        for step in range(steps):
            step_started = time.perf_counter()
            x, y = worker_batch(data, sizes, rank, epoch, step, config.seed)
            if config.input_shift is not None and config.input_shift[0] == rank:
                x = x + config.input_shift[1]
            x, y = x.to(device=device, dtype=dtype), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            out = trained(x)
            if global_mean is not None:
                loss = global_mean(F.cross_entropy(out, y, reduction="none"))
                losses.append(global_mean.last_mean_loss)
            else:
                loss = F.cross_entropy(out, y)
                losses.append(float(loss.detach()))
            loss.backward()
            optimizer.step()
            schedule.step()
            if reporter is not None:
                reporter.step(epoch * steps + step, len(y), time.perf_counter() - step_started)
            if progress is not None:
                progress.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}", refresh=False)
                progress.update()
    if progress is not None:
        progress.close()
    if reporter is not None:
        reporter.close()
    if config.precise_bn_batches and config.norm == "sync":
        batches = (
            worker_batch(data, sizes, rank, 0, s, config.seed)[0].to(device=device, dtype=dtype)
            for s in range(steps)
        )
        precise_bn(model, batches, num_batches=config.precise_bn_batches)
    seconds = time.perf_counter() - started
    accuracy = test_accuracy(model, data, device, dtype)
    if config.checkpoint and rank == 0:
        torch.save(model.state_dict(), config.checkpoint)
    if distributed:
        dist.barrier()  # nobody leaves while rank 0 still writes
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return TrainResult(
        rank, world_size, sizes, config.norm, accuracy, config.epochs * steps, seconds, losses,
        state if config.return_state and rank == 0 else None,
    )  # fmt: skip


def train_rank(rank: int, world_size: int, config: TrainConfig) -> TrainResult:
    """:func:`train_worker` with the argument order of :func:`syncnorm.launch.run_local_group`."""
    return train_worker(config, rank, world_size)


def _progress(config: TrainConfig, rank: int, total: int):  # noqa: ANN202 - tqdm or None
    if rank != 0 or not config.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"train ({config.norm} norm)", unit="step", file=sys.stderr, leave=False)
