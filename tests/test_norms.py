"""The synchronized norms of syncnorm.norms on real multi-process Gloo groups, against
each paper's formula applied to the concatenated global batch (tests/norm_cases.py)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import syncnorm
from syncnorm import TorchDistributedReducer
from syncnorm.moments import Moments
from syncnorm.transports.base import LayerKey, StatsReducer
from tests.norm_cases import (
    KINDS,
    NormCase,
    NormTrace,
    assert_matches_reference,
    build_layer,
    run_layer,
    run_reference,
)

CASES = {
    **{f"{kind}-2-ranks-one-empty-fp64": NormCase(kind, sizes=(0, 5)) for kind in KINDS},
    **{
        f"{kind}-3-ranks-uneven-fp32-cumulative": NormCase(
            kind, sizes=(3, 0, 2), dtype=torch.float32, momentum=None, seed=1
        )
        for kind in KINDS
    },
    "switchable-2-ranks-untracked-fp64": NormCase("switchable", sizes=(1, 4), track_running_stats=False),
    "switchable-2-ranks-bf16": NormCase("switchable", sizes=(3, 2), dtype=torch.bfloat16),
    "batch_instance-3-ranks-allreduce-fp64": NormCase(
        "batch_instance", sizes=(2, 1, 4), primitive="all_reduce", steps=3
    ),
    "batch_instance-2-ranks-channels-last-fp32": NormCase(
        "batch_instance", sizes=(2, 3), dtype=torch.float32, channels_last=True
    ),
    "conditional_index-2-ranks-fp16": NormCase("conditional_index", sizes=(4, 1), dtype=torch.float16),
    "mean_only-2-ranks-allgather-fp32": NormCase(
        "mean_only", sizes=(1, 6), dtype=torch.float32, primitive="all_gather"
    ),
}


def _rank_trace(rank: int, world_size: int, case: NormCase) -> NormTrace:
    reducer = None if case.primitive == "auto" else TorchDistributedReducer(primitive=case.primitive)
    return run_layer(build_layer(case, reducer), case, rank)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_paper_formula_on_the_concatenated_batch(ranks, name: str) -> None:
    case = CASES[name]
    traces = ranks(case.world_size).run(_rank_trace, case)
    assert_matches_reference(traces, run_reference(case), case)
    for rank, size in enumerate(case.sizes):
        if size == 0:  # an empty batch takes part and contributes nothing to parameter grads
            assert all(
                float(g.abs().max()) == 0 for grads in traces[rank].param_grads for g in grads.values()
            )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_without_a_process_group_it_is_the_paper_formula_on_the_local_batch(kind: str, dtype) -> None:
    case = NormCase(kind, sizes=(6,), dtype=dtype, seed=2)
    assert build_layer(case).active_reducer() is None
    assert_matches_reference([run_layer(build_layer(case), case, 0)], run_reference(case), case)


def test_gradients_through_the_batch_branch_pass_gradcheck() -> None:
    from syncnorm.batch_moments import LOCAL, global_batch_moments
    from syncnorm.norms.base import NormLayerKey

    key = NormLayerKey("gradcheck", 3)
    x = torch.randn(4, 3, 2, 3, dtype=torch.float64, requires_grad=True)

    def statistics(t: Tensor) -> tuple[Tensor, Tensor]:
        stats = global_batch_moments(t, LOCAL, key)
        return stats.mean, stats.var

    assert torch.autograd.gradcheck(statistics, (x,))


# -- one collective per direction --------------------------------------------------


class CountingReducer(StatsReducer):
    """Counts the rounds each layer asks of the wrapped transport."""

    def __init__(self, inner: StatsReducer) -> None:
        self.inner = inner
        self.calls: Counter[tuple[str, str]] = Counter()

    def merge_moments(self, local: Moments, layer: LayerKey) -> Moments:
        self.calls[(layer.name, "forward")] += 1
        return self.inner.merge_moments(local, layer)

    def sum_across_workers(self, local: Tensor, layer: LayerKey) -> Tensor:
        self.calls[(layer.name, "backward")] += 1
        return self.inner.sum_across_workers(local, layer)


class _EveryNorm(nn.Module):
    def __init__(self, reducer: StatsReducer) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bin = syncnorm.SyncBatchInstanceNorm2d(4, reducer=reducer)
        self.sn = syncnorm.SyncSwitchableNorm2d(4, reducer=reducer)
        self.mean_only = syncnorm.SyncMeanOnlyBatchNorm2d(4, reducer=reducer)
        self.cond = syncnorm.SyncConditionalBatchNorm2d(4, 3, reducer=reducer)
        syncnorm.name_layers(self)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.mean_only(self.sn(self.bin(self.conv(x))))
        return self.cond(h, y).relu().mean(dim=(1, 2, 3))


def _count_rounds(rank: int, world_size: int, sizes: tuple[int, ...]) -> dict[str, int]:
    reducer = CountingReducer(TorchDistributedReducer())
    model = _EveryNorm(reducer)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        x = torch.randn(sizes[rank], 2, 4, 4, generator=g)
        model(x, torch.randint(0, 3, (sizes[rank],), generator=g)).sum().backward()
    training = dict(reducer.calls)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 2, 4, 4), torch.tensor([0, 2]))
    assert dict(reducer.calls) == training, "eval with running statistics communicated"
    return {f"{name}/{direction}": count for (name, direction), count in training.items()}


def test_one_collective_in_forward_and_one_in_backward_per_layer_call(ranks) -> None:
    for calls in ranks(2).run(_count_rounds, (3, 0)):
        expected = {
            f"{name}/{d}": 3 for name in ("bin", "sn", "mean_only", "cond") for d in ("forward", "backward")
        }
        assert calls == expected


# -- DDP with uneven batches: the whole step equals one process ----------------------


def _norm_cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), syncnorm.SyncSwitchableNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), syncnorm.SyncBatchInstanceNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).double()  # fmt: skip


def _data(sizes: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(sum(sizes), 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (sum(sizes),), generator=g
    )


def _ddp_step(rank: int, world_size: int, sizes: tuple[int, ...]) -> dict[str, Tensor]:
    model = syncnorm.name_layers(_norm_cnn(0))
    ddp = nn.parallel.DistributedDataParallel(model)
    global_mean = syncnorm.GlobalBatchMean(ddp)
    x, y = _data(sizes)
    lo = sum(sizes[:rank])
    losses = F.cross_entropy(ddp(x[lo : lo + sizes[rank]]), y[lo : lo + sizes[rank]], reduction="none")
    global_mean(losses).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_ddp_step_with_uneven_batches_equals_one_process(ranks) -> None:
    sizes = (1, 4, 2)
    grads = ranks(3).run(_ddp_step, sizes)
    model = _norm_cnn(0)
    x, y = _data(sizes)
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        for rank_grads in grads:
            torch.testing.assert_close(rank_grads[name], p.grad, rtol=1e-10, atol=1e-10, msg=name)
