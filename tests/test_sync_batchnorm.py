"""SyncBatchNorm on real multi-process Gloo groups against torch's BatchNorm on
the concatenated global batch (tests/cases.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import syncnorm
from syncnorm import SyncBatchNorm, TorchDistributedReducer
from tests.cases import Case, Trace, assert_matches_reference, reference_layer, run_layer

CASES = {
    "2d-uneven-fp64": Case(sizes=(3, 5)),
    "1d-empty-rank-allreduce": Case(sizes=(0, 4), spatial=(), primitive="all_reduce"),
    "3d-batch-one-and-empty-fp32-cumulative": Case(
        sizes=(1, 0, 6), spatial=(2, 2, 2), dtype=torch.float32, momentum=None
    ),
    "seq-no-affine-fp32-allreduce": Case(
        sizes=(2, 1, 0, 5), spatial=(5,), dtype=torch.float32, affine=False, primitive="all_reduce"
    ),
    "2d-equal-untracked-fp64": Case(sizes=(4, 4, 4, 4), track_running_stats=False),
    "2d-allgather-fp32-three-steps": Case(sizes=(2, 7), dtype=torch.float32, primitive="all_gather", steps=3),
    "2d-weight-without-bias": Case(sizes=(3, 2), layer_kwargs={"bias": False}),
    "2d-bf16": Case(sizes=(3, 5), dtype=torch.bfloat16),
    "1d-fp16-allreduce": Case(sizes=(4, 0, 3), spatial=(), dtype=torch.float16, primitive="all_reduce"),
    "2d-channels-last-fp32": Case(sizes=(2, 3), spatial=(3, 4), dtype=torch.float32, channels_last=True),
    "3d-channels-last-fp64": Case(sizes=(1, 3), spatial=(2, 3, 2), channels_last=True),
}


def _sync_layer(case: Case) -> SyncBatchNorm:
    reducer = None if case.primitive == "auto" else TorchDistributedReducer(primitive=case.primitive)
    param_dtype = torch.float32 if case.half else case.dtype
    return SyncBatchNorm(
        case.channels, momentum=case.momentum, affine=case.affine,
        track_running_stats=case.track_running_stats, reducer=reducer, dtype=param_dtype,
        **case.layer_kwargs,
    )  # fmt: skip


def _rank_trace(rank: int, world_size: int, case: Case) -> Trace:
    trace = run_layer(_sync_layer(case), case, rank)
    if case.channels_last:
        fmt = torch.channels_last if len(case.spatial) == 2 else torch.channels_last_3d
        for t in trace.outputs + trace.input_grads:
            assert t.is_contiguous(memory_format=fmt), "memory format not kept"
    return trace


@pytest.mark.parametrize("name", list(CASES))
def test_matches_batchnorm_on_concatenated_batch(ranks, name: str) -> None:
    case = CASES[name]
    traces = ranks(case.world_size).run(_rank_trace, case)
    assert_matches_reference(traces, run_layer(reference_layer(case), case, None), case)
    for rank, size in enumerate(case.sizes):
        if size == 0 and case.affine:
            assert all(float(g.abs().max()) == 0 for g in traces[rank].weight_grads)


def _deep_copy_trace(rank: int, world_size: int, case: Case) -> Trace:
    original = _sync_layer(case)
    run_layer(original, case, rank)  # the original has run and shaken hands
    return run_layer(copy.deepcopy(original), case, rank)


def test_deep_copy_of_a_layer_is_a_working_layer(ranks) -> None:
    """EMA or eval copies: the copy shares the transport and synchronizes on its own."""
    case = Case(sizes=(2, 3), primitive="all_gather")
    traces = ranks(2).run(_deep_copy_trace, case)
    reference = reference_layer(case)
    run_layer(reference, case, None)
    assert_matches_reference(traces, run_layer(reference, case, None), case)


def _subgroup_trace(rank: int, world_size: int, cases: tuple[Case, Case]) -> Trace:
    group = syncnorm.consecutive_groups(2)
    case = cases[rank // 2]
    layer = SyncBatchNorm(case.channels, process_group=group, dtype=case.dtype)
    return run_layer(layer, case, rank % 2)  # rank r is position r % 2 of its group's case


def test_process_group_syncs_only_within_group(ranks) -> None:
    cases = (Case(sizes=(2, 5), seed=1), Case(sizes=(4, 1), seed=2))
    traces = ranks(4).run(_subgroup_trace, cases)
    for members, case in ((traces[:2], cases[0]), (traces[2:], cases[1])):
        assert_matches_reference(members, run_layer(reference_layer(case), case, None), case)


def test_consecutive_groups_rejects_non_divisor(ranks) -> None:
    messages = ranks(3).run(_consecutive_groups_error, 2)
    assert all("positive divisor of the world size 3" in m for m in messages)


def _consecutive_groups_error(rank: int, world_size: int, size: int) -> str:
    with pytest.raises(ValueError) as info:
        syncnorm.consecutive_groups(size)
    return str(info.value)


def test_without_process_group_it_is_torch_batchnorm() -> None:
    case = Case(sizes=(6,), dtype=torch.float32)
    sync = run_layer(_sync_layer(case), case, None)
    reference = run_layer(reference_layer(case), case, None)
    for a, b in zip(sync.outputs + sync.input_grads, reference.outputs + reference.input_grads, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(sync.running_var, reference.running_var)


def _group_freed_after_destroy(rank: int, world_size: int) -> bool:
    import gc
    import weakref

    group = dist.new_group(list(range(world_size)))
    layer = syncnorm.SyncBatchNorm(3, process_group=group)
    layer(torch.randn(4, 3, 2, 2) + rank).sum().backward()
    freed = weakref.ref(group)
    dist.destroy_process_group(group)
    del layer, group
    gc.collect()
    return freed() is None


def test_a_destroyed_group_is_not_kept_alive(ranks) -> None:
    """syncnorm's per-group reducer cache holds groups weakly: a group it kept alive
    until interpreter exit was destroyed late there, which aborted about one Gloo
    process in 30 ("terminate called without an active exception")."""
    assert ranks(2).run(_group_freed_after_destroy) == [True, True]
