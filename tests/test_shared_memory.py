"""The shared-memory all-gather of same-host Gloo groups (syncnorm.transports.shared_memory).

The equivalence cases of test_sync_batchnorm.py with ``primitive="auto"`` run
through it too; these tests pin down what is particular to it.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch

from syncnorm import SyncBatchNorm, TorchDistributedReducer
from syncnorm.transports import shared_memory
from syncnorm.transports.shared_memory import SHM_DIR
from syncnorm.transports.torch_distributed import SHARED_MEMORY_ENV
from tests.cases import Case, assert_matches_reference, reference_layer, run_layer
from tests.ranks import caught


def _primitive_after_first_call(rank: int, world_size: int, opt_out: bool) -> str:
    if opt_out:
        os.environ[SHARED_MEMORY_ENV] = "0"
    try:
        reducer = TorchDistributedReducer()
        SyncBatchNorm(3, reducer=reducer)(torch.randn(4, 3))
        return reducer.primitive
    finally:
        os.environ.pop(SHARED_MEMORY_ENV, None)


@pytest.mark.parametrize(("opt_out", "expected"), [(False, "shared_memory"), (True, "all_gather")])
def test_auto_takes_shared_memory_on_one_host_unless_opted_out(ranks, opt_out: bool, expected: str) -> None:
    assert ranks(2).run(_primitive_after_first_call, opt_out) == [expected, expected]


def _primitive_when_one_rank_cannot(rank: int, world_size: int) -> str:
    saved = shared_memory.SHM_DIR
    if rank == 1:
        shared_memory.SHM_DIR = "/nonexistent/shm"  # this rank alone cannot take part
    try:
        reducer = TorchDistributedReducer()
        SyncBatchNorm(3, reducer=reducer)(torch.randn(4, 3))
        return reducer.primitive
    finally:
        shared_memory.SHM_DIR = saved


def test_all_ranks_fall_back_together_when_one_cannot_share_memory(ranks) -> None:
    assert ranks(3).run(_primitive_when_one_rank_cannot) == ["all_gather"] * 3


# Three layers through one reducer: the second is wider than the region the first
# opened, so the region grows between rounds; the third runs in the grown region.
WIDENING = [
    Case(sizes=(3, 0, 2), channels=3, steps=3),
    Case(sizes=(1, 4, 2), channels=40, dtype=torch.float32, seed=1),
    Case(sizes=(2, 2, 2), channels=5, spatial=(4,), seed=2),
]


def _widening_traces(rank: int, world_size: int) -> tuple[list, list[str], int]:
    before = set(glob.glob(os.path.join(SHM_DIR, "syncnorm-*")))
    reducer = TorchDistributedReducer(primitive="shared_memory")
    traces = []
    for case in WIDENING:
        layer = SyncBatchNorm(case.channels, reducer=reducer, dtype=case.dtype)
        traces.append(run_layer(layer, case, rank))
    left = sorted(set(glob.glob(os.path.join(SHM_DIR, "syncnorm-*"))) - before)
    assert reducer._channel is not None
    return traces, left, reducer._channel.width


def test_layers_of_growing_width_match_batchnorm_and_leave_no_file(ranks) -> None:
    results = ranks(3).run(_widening_traces)
    for i, case in enumerate(WIDENING):
        reference = run_layer(reference_layer(case), case, None)
        assert_matches_reference([r[0][i] for r in results], reference, case)
    for _, left, width in results:
        assert left == [], f"region files left in {SHM_DIR}: {left}"
        assert width >= 2 + 2 * 40


def _swapped_layers_of_different_width(rank: int, world_size: int) -> tuple[str | None, str]:
    reducer = TorchDistributedReducer(primitive="shared_memory")
    layers = {"narrow": SyncBatchNorm(3, reducer=reducer), "wide": SyncBatchNorm(7, reducer=reducer)}
    for name, layer in layers.items():
        layer.layer_name = name
        layer(torch.randn(4, layer.num_features))  # a first step in the same order on all ranks
    first = layers["narrow" if rank == 0 else "wide"]
    return caught(first, torch.randn(4, first.num_features))


def test_layers_of_different_width_in_different_order_raise_instead_of_aborting(ranks) -> None:
    # Gloo aborts the process on an all_gather of mismatched sizes; shared-memory
    # rows are as wide as the widest layer, so the headers can be compared.
    results = ranks(2).run(_swapped_layers_of_different_width)
    for rank, (kind, message) in enumerate(results):
        assert kind == "LayerMismatchError", message
        mine, other = ("'narrow'", "'wide'") if rank == 0 else ("'wide'", "'narrow'")
        assert mine in message and f"forward synchronization of SyncBatchNorm layer {other}" in message


def _forward_against_backward(rank: int, world_size: int) -> tuple[str | None, str]:
    layer = SyncBatchNorm(3, reducer=TorchDistributedReducer(primitive="shared_memory"))
    layer.layer_name = "bn"
    x = torch.randn(4, 3, requires_grad=True)
    y = layer(x)
    if rank == 0:
        return caught(y.sum().backward)  # rank 0 goes on to the backward round ...
    return caught(layer, x)  # ... rank 1 to a second forward of the same layer


def test_forward_and_backward_of_one_layer_are_told_apart(ranks) -> None:
    results = ranks(2).run(_forward_against_backward)
    for rank, (kind, message) in enumerate(results):
        assert kind == "LayerMismatchError", message
        direction, theirs = ("backward", "forward") if rank == 0 else ("forward", "backward")
        assert f"'bn' (num_features=3): {direction} synchronization mismatch" in message
        assert f"rank {1 - rank} was in the {theirs} synchronization of SyncBatchNorm layer 'bn'" in message


def _wider_layer_when_the_region_cannot_grow(rank: int, world_size: int) -> tuple[list, int]:
    reducer = TorchDistributedReducer(primitive="shared_memory")
    narrow, wide = WIDENING[0], WIDENING[1]
    traces = [run_layer(SyncBatchNorm(narrow.channels, reducer=reducer, dtype=narrow.dtype), narrow, rank)]
    create_file = shared_memory._create_file

    def full(*args: object) -> str:
        raise OSError(28, "No space left on device")

    shared_memory._create_file = full  # only rank 0 creates files: it finds /dev/shm full
    try:
        traces.append(run_layer(SyncBatchNorm(wide.channels, reducer=reducer, dtype=wide.dtype), wide, rank))
    finally:
        shared_memory._create_file = create_file
    assert reducer._channel is not None
    return traces, reducer._channel.width


def test_rounds_wider_than_a_region_that_cannot_grow_go_through_gloo(ranks) -> None:
    results = ranks(3).run(_wider_layer_when_the_region_cannot_grow)
    for i, case in enumerate(WIDENING[:2]):
        reference = run_layer(reference_layer(case), case, None)
        assert_matches_reference([r[0][i] for r in results], reference, case)
    assert [width for _, width in results] == [2 + 2 * WIDENING[0].channels] * 3
