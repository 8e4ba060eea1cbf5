"""Uneven batches, uneven iteration counts and precise BN against one process
trained on the concatenated batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

import syncnorm


def _cnn(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5, momentum=None), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    ).to(dtype)  # fmt: skip


def _step_batches(
    step: int, sizes: tuple[int, ...], dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(sum(sizes), 1, 5, 5, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 3, (sum(sizes),), generator=g)
    return list(zip(torch.split(x, list(sizes)), torch.split(y, list(sizes)), strict=True))


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def _reference(
    sizes: tuple[int, ...], counts: tuple[int, ...], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """One process, torch BatchNorm; step s trains on the concatenated batches of
    the ranks that still have data (rank r has ``counts[r]`` batches)."""
    model = _cnn(dtype)
    optimizer = _sgd(model)
    for step in range(max(counts)):
        batches = _step_batches(step, sizes, dtype)
        parts = [batches[r] for r in range(len(sizes)) if step < counts[r] and sizes[r] > 0]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.state_dict()


def _assert_state_equal(
    state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tol: float
) -> None:
    assert list(state) == list(reference)
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=tol, atol=tol, msg=key)


def _uneven_rank(rank: int, world_size: int, sizes: tuple[int, ...], steps: int, dtype: torch.dtype) -> dict:
    ddp = DistributedDataParallel(syncnorm.convert_sync_batchnorm(_cnn(dtype)))
    global_mean = syncnorm.GlobalBatchMean(ddp)
    optimizer = _sgd(ddp)
    for step in range(steps):
        x, y = _step_batches(step, sizes, dtype)[rank]
        optimizer.zero_grad()
        global_mean(nn.functional.cross_entropy(ddp(x), y, reduction="none")).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in ddp.module.state_dict().items()}


@pytest.mark.parametrize(
    ("sizes", "dtype", "tol"),
    [((5, 1), torch.float32, 1e-5), ((2, 7, 1), torch.float64, 1e-10), ((3, 1, 6, 2), torch.float32, 1e-5)],
)
def test_uneven_batches_ten_sgd_steps_equal_one_process(ranks, sizes, dtype, tol) -> None:
    reference = _reference(sizes, (10,) * len(sizes), dtype)
    for state in ranks(len(sizes)).run(_uneven_rank, sizes, 10, dtype):
        _assert_state_equal(state, reference, tol)


def test_without_batch_weighting_uneven_batches_are_not_exact(ranks) -> None:
    """The test above can fail: DDP's plain average of per-worker means is not the global-batch gradient."""
    sizes = (5, 1)
    reference = _reference(sizes, (3,) * len(sizes), torch.float64)
    states = ranks(2).run(_plain_ddp_rank, sizes, 3)
    with pytest.raises(AssertionError):
        _assert_state_equal(states[0], reference, 1e-6)


def _plain_ddp_rank(rank: int, world_size: int, sizes: tuple[int, ...], steps: int) -> dict:
    ddp = DistributedDataParallel(syncnorm.convert_sync_batchnorm(_cnn(torch.float64)))
    optimizer = _sgd(ddp)
    for step in range(steps):
        x, y = _step_batches(step, sizes, torch.float64)[rank]
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()
    return ddp.module.state_dict()


def _joined_rank(rank: int, world_size: int, sizes: tuple[int, ...], counts: tuple[int, ...]) -> dict:
    ddp = syncnorm.join_ready_ddp(syncnorm.convert_sync_batchnorm(_cnn(torch.float64)))
    sync_join = syncnorm.SyncBatchNormJoin(ddp)
    global_mean = syncnorm.GlobalBatchMean(ddp)
    optimizer = _sgd(ddp)
    with Join([sync_join, ddp]):
        for step in range(counts[rank]):
            x, y = _step_batches(step, sizes, torch.float64)[rank]
            optimizer.zero_grad()
            global_mean(nn.functional.cross_entropy(ddp(x), y, reduction="none")).backward()
            optimizer.step()
    return ddp.module.state_dict()


def test_ranks_with_3_and_5_batches_finish_and_match_the_ranks_with_data(ranks) -> None:
    sizes, counts = (4, 3), (3, 5)  # steps 3 and 4: only rank 1 still has data
    reference = _reference(sizes, counts, torch.float64)
    for state in ranks(2).run(_joined_rank, sizes, counts, timeout=120):
        _assert_state_equal(state, reference, 1e-10)


def test_uneven_iterations_on_three_ranks(ranks) -> None:
    sizes, counts = (2, 3, 4), (4, 2, 3)
    reference = _reference(sizes, counts, torch.float64)
    for state in ranks(3).run(_joined_rank, sizes, counts, timeout=120):
        _assert_state_equal(state, reference, 1e-10)


def _join_misuse(rank: int, world_size: int) -> None:
    ddp = DistributedDataParallel(syncnorm.convert_sync_batchnorm(_cnn(torch.float64)))
    with pytest.raises(ValueError, match=r"syncnorm\.join_ready_ddp"):
        syncnorm.SyncBatchNormJoin(ddp)
    ddp = syncnorm.join_ready_ddp(syncnorm.convert_sync_batchnorm(_cnn(torch.float64)))
    sync_join = syncnorm.SyncBatchNormJoin(ddp)
    with pytest.raises(ValueError, match="must come first"), Join([ddp, sync_join]):
        ddp(torch.randn(2, 1, 5, 5))


def test_join_misuse_gets_clear_errors(ranks) -> None:
    ranks(2).run(_join_misuse)


def _precise_rank(rank: int, world_size: int, plan: tuple[int, ...]) -> dict:
    model = syncnorm.convert_sync_batchnorm(_cnn(torch.float64))
    model.eval()
    batches = [_step_batches(step, plan, torch.float64)[rank] for step in range(3 + rank)]
    used = syncnorm.precise_bn(model, batches, num_batches=200)
    assert used == len(batches)
    assert not model.training
    return model.state_dict()


def test_precise_bn_is_the_population_statistics_of_all_workers(ranks) -> None:
    plan = (3, 5)
    # Rank 0 has 3 batches, rank 1 has 4: step 3 has only rank 1's batch.
    counts = (3, 4)
    model = _cnn(torch.float64)
    captured: dict[int, list[torch.Tensor]] = {1: [], 4: []}

    def capture(index: int):  # noqa: ANN202
        return lambda _m, args: captured[index].append(args[0].detach())

    handles = [model[i].register_forward_pre_hook(capture(i)) for i in captured]
    model.train()
    with torch.no_grad():
        for step in range(max(counts)):
            batches = _step_batches(step, plan, torch.float64)
            model(torch.cat([batches[r][0] for r in range(2) if step < counts[r]]))
    for h in handles:
        h.remove()
    states = ranks(2).run(_precise_rank, plan)
    for index, inputs in captured.items():
        values = torch.cat(inputs).transpose(0, 1).reshape(inputs[0].shape[1], -1)
        for state in states:
            torch.testing.assert_close(state[f"{index}.running_mean"], values.mean(1), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(state[f"{index}.running_var"], values.var(1), rtol=1e-10, atol=1e-10)
            assert int(state[f"{index}.num_batches_tracked"]) == 0


def test_precise_bn_in_one_process() -> None:
    model = syncnorm.convert_sync_batchnorm(_cnn(torch.float64))
    xs = [_step_batches(s, (6,), torch.float64)[0][0] for s in range(4)]
    assert syncnorm.precise_bn(model, xs, num_batches=3) == 3
    with torch.no_grad():
        acts = model[0](torch.cat(xs[:3])).transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(model[1].running_mean, acts.mean(1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model[1].running_var, acts.var(1), rtol=1e-10, atol=1e-10)


def test_precise_bn_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no SyncBatchNorm layers"):
        syncnorm.precise_bn(nn.Linear(2, 2), [torch.randn(3, 2)])
    with pytest.raises(ValueError, match="num_batches must be at least 1"):
        syncnorm.precise_bn(syncnorm.convert_sync_batchnorm(_cnn(torch.float64)), [], num_batches=0)
