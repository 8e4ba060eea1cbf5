"""The synchronized norms reject bad input with a clear error and change no state."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import syncnorm
from tests.norm_cases import KINDS, NormCase, build_layer
from tests.ranks import caught


def _state(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _assert_unchanged(layer: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = layer.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed by a rejected call"


def _call(layer: nn.Module, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
    return layer(x) if condition is None else layer(x, condition)


def _good_condition(kind: str, n: int) -> torch.Tensor | None:
    if kind == "conditional_index":
        return torch.zeros(n, dtype=torch.long)
    if kind == "conditional_vector":
        return torch.zeros(n, 4)
    return None


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_channel_count_names_the_layer_and_changes_nothing(kind: str) -> None:
    layer = build_layer(NormCase(kind, sizes=(4,), dtype=torch.float32))
    layer.layer_name = "stage2.norm"
    before = _state(layer)
    with pytest.raises(ValueError) as info:
        _call(layer, torch.randn(4, 5, 3, 3), _good_condition(kind, 4))
    message = str(info.value)
    assert "'stage2.norm'" in message and type(layer).__name__ in message
    assert "5 channels" in message and "num_features=3" in message
    _assert_unchanged(layer, before)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (torch.randn(4, 3), "expects a 4-D input (N, C, H, W), got shape (4, 3)"),
        (torch.randn(4, 3, 2, 2, 2), "expects a 4-D input"),
        (torch.ones(4, 3, 2, 2, dtype=torch.long), "expects a floating-point input, got torch.int64"),
    ],
)
def test_wrong_input_layout_or_dtype_is_rejected(kind: str, x: torch.Tensor, expected: str) -> None:
    layer = build_layer(NormCase(kind, sizes=(4,), dtype=torch.float32))
    before = _state(layer)
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        _call(layer, x, _good_condition(kind, 4))
    _assert_unchanged(layer, before)


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        (
            torch.tensor([0, 1, 4]),
            "class index 4 is out of range for num_conditions=4 (indices must be in [0, 3])",
        ),
        (torch.tensor([0, -1, 2]), "class index -1 is out of range"),
        (torch.tensor([0, 1]), "integer class indices must have shape (N,) = (3,), got (2,)"),
        (
            torch.zeros(3, 1, dtype=torch.long),
            "integer class indices must have shape (N,) = (3,), got (3, 1)",
        ),
        (torch.zeros(3, 5), "must have shape (N, num_conditions) = (3, 4), got (3, 5)"),
        (torch.zeros(3), "must have shape (N, num_conditions) = (3, 4), got (3,)"),
        (torch.zeros(3, dtype=torch.bool), "got dtype torch.bool"),
        ([0, 1, 2], "the condition must be a tensor, got list"),
    ],
)
def test_bad_condition_is_rejected_before_anything_changes(condition: object, expected: str) -> None:
    layer = syncnorm.SyncConditionalBatchNorm2d(3, num_conditions=4)
    layer.layer_name = "gen.block1.cbn"
    before = _state(layer)
    with pytest.raises(ValueError) as info:
        layer(torch.randn(3, 3, 2, 2), condition)
    assert expected in str(info.value)
    assert "SyncConditionalBatchNorm2d layer 'gen.block1.cbn'" in str(info.value)
    _assert_unchanged(layer, before)


def test_empty_batch_with_empty_condition_is_fine_alone_only_when_the_group_has_values() -> None:
    layer = syncnorm.SyncConditionalBatchNorm2d(3, num_conditions=4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(torch.randn(0, 3, 2, 2), torch.zeros(0, dtype=torch.long))
    layer.eval()
    assert layer(torch.randn(0, 3, 2, 2), torch.zeros(0, dtype=torch.long)).shape == (0, 3, 2, 2)


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: syncnorm.SyncSwitchableNorm2d(0), "num_features must be a positive int, got 0"),
        (lambda: syncnorm.SyncBatchInstanceNorm2d(3, momentum=1.5), "momentum must be in [0, 1] or None"),
        (lambda: syncnorm.SyncConditionalBatchNorm2d(3, 0), "num_conditions must be a positive int, got 0"),
        (
            lambda: syncnorm.SyncConditionalBatchNorm2d(3, 2.0),
            "num_conditions must be a positive int, got 2.0",
        ),
    ],
)
def test_bad_constructor_arguments(build: Callable[[], nn.Module], expected: str) -> None:
    with pytest.raises(ValueError) as info:
        build()
    assert expected in str(info.value)


# -- across ranks ---------------------------------------------------------------


def _too_few_values(rank: int, world_size: int, kind: str, sizes: tuple[int, ...]) -> tuple[str | None, str]:
    layer = build_layer(NormCase(kind, sizes=sizes, dtype=torch.float32))
    before = _state(layer)
    n = sizes[rank]
    result = caught(_call, layer, torch.randn(n, 3, 1, 1), _good_condition(kind, n))
    _assert_unchanged(layer, before)
    return result


@pytest.mark.parametrize("kind", ["switchable", "mean_only", "conditional_index"])
def test_at_most_one_value_per_channel_in_the_group_raises_like_torch(ranks, kind: str) -> None:
    for error, message in ranks(2).run(_too_few_values, kind, (1, 0)):
        assert error == "ValueError"
        assert "Expected more than 1 value per channel when training" in message
        assert "1 value(s) per channel in the whole synchronization group" in message


def _different_channels(rank: int, world_size: int) -> tuple[str | None, str]:
    model = syncnorm.name_layers(nn.Sequential(syncnorm.SyncSwitchableNorm2d(3 + rank)))
    return caught(model, torch.randn(2, 3 + rank, 2, 2))


def test_workers_with_different_channel_counts_get_a_layer_mismatch_naming_the_layer(ranks) -> None:
    for error, message in ranks(2).run(_different_channels):
        assert error == "LayerMismatchError"
        assert "SyncSwitchableNorm2d layer '0'" in message
        assert "num_features=3" in message and "num_features=4" in message


def _join_with_other_norms(rank: int, world_size: int) -> tuple[str | None, str]:
    model = syncnorm.convert_sync_batchnorm(
        nn.Sequential(nn.BatchNorm2d(3), syncnorm.SyncSwitchableNorm2d(3))
    )
    return caught(syncnorm.SyncBatchNormJoin, model)


def test_join_refuses_models_with_the_other_norms_instead_of_hanging(ranks) -> None:
    for error, message in ranks(2).run(_join_with_other_norms):
        assert error == "ValueError"
        assert "also has SyncSwitchableNorm2d layer '1'" in message
