"""Bad input gets a clear error, on every rank, and changes no state."""

from __future__ import annotations

import pytest
import torch

from syncnorm import LayerMismatchError, SyncBatchNorm, TorchDistributedReducer, convert_sync_batchnorm
from tests.ranks import caught


def _channel_mismatch(rank: int, world_size: int) -> tuple[str | None, str]:
    model = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(4 + 2 * rank)))
    return caught(model, torch.randn(3, 4 + 2 * rank))


def test_different_channel_counts_name_the_layer(ranks) -> None:
    for kind, message in ranks(2).run(_channel_mismatch):
        assert kind == "LayerMismatchError"
        assert "'0'" in message and "num_features=4" in message and "num_features=6" in message


def _two_layers(primitive: str) -> torch.nn.Module:
    bn = torch.nn.ModuleDict({"stem": torch.nn.BatchNorm2d(3), "head": torch.nn.BatchNorm2d(3)})
    reducer = TorchDistributedReducer(primitive=primitive)
    return convert_sync_batchnorm(bn, reducer=reducer)


def _swapped_order(rank: int, world_size: int, primitive: str) -> tuple[str | None, str]:
    layers = _two_layers(primitive)
    x = torch.randn(2, 3, 2, 2)
    layers["stem"](x), layers["head"](x)  # a first step in the same order on all ranks
    order = ["stem", "head"] if rank == 0 else ["head", "stem"]
    before = layers[order[0]].running_mean.clone()
    kind, message = caught(layers[order[0]], x)
    assert torch.equal(layers[order[0]].running_mean, before), "a rejected call changed state"
    return kind, message


@pytest.mark.parametrize("primitive", ["all_gather", "all_reduce", "shared_memory"])
def test_layers_called_in_different_order_raise_naming_them(ranks, primitive: str) -> None:
    results = ranks(2).run(_swapped_order, primitive)
    for rank, (kind, message) in enumerate(results):
        assert kind == "LayerMismatchError", message
        assert ("'stem'" if rank == 0 else "'head'") in message
        if primitive != "all_reduce":  # the gathered signatures tell what the other rank ran
            assert ("'head'" if rank == 0 else "'stem'") in message


def _too_few_values(rank: int, world_size: int, sizes: tuple[int, ...]) -> tuple[str | None, str]:
    layer = SyncBatchNorm(5)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    kind, message = caught(layer, torch.randn(sizes[rank], 5))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed by a rejected batch"
    return kind, message


@pytest.mark.parametrize("sizes", [(1, 0), (0, 0)])
def test_at_most_one_value_per_channel_in_group_raises_like_torch(ranks, sizes) -> None:
    for kind, message in ranks(2).run(_too_few_values, sizes):
        assert kind == "ValueError"
        assert "Expected more than 1 value per channel when training" in message


def _one_value_here_but_more_elsewhere(rank: int, world_size: int) -> tuple[int, ...]:
    return tuple(SyncBatchNorm(5)(torch.randn(1 + 3 * rank, 5)).shape)


def test_one_value_on_a_rank_is_fine_when_the_group_has_more(ranks) -> None:
    assert ranks(2).run(_one_value_here_but_more_elsewhere) == [(1, 5), (4, 5)]


@pytest.mark.parametrize("shape", [(4,), (2, 3, 2, 2, 2, 2)])
def test_wrong_input_rank_raises_value_error_like_torch(shape) -> None:
    with pytest.raises(ValueError, match=rf"expected 2D, 3D, 4D or 5D input \(got {len(shape)}D input\)"):
        SyncBatchNorm(shape[1] if len(shape) > 1 else 4)(torch.randn(shape))
    with pytest.raises(ValueError, match=rf"\(got {len(shape)}D input\)"):
        torch.nn.BatchNorm2d(4)(torch.randn(shape))  # torch's own error, for comparison


def test_wrong_channel_count_names_the_layer() -> None:
    model = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(4)))
    with pytest.raises(ValueError, match=r"layer '1' \(num_features=4\) got an input with 3 channels"):
        model(torch.randn(2, 3))


def test_reducer_needs_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        TorchDistributedReducer()


def test_mismatch_error_is_a_runtime_error() -> None:
    assert issubclass(LayerMismatchError, RuntimeError)


@pytest.mark.parametrize("value", ["soon", "0", "-3"])
def test_bad_timeout_setting_is_rejected(monkeypatch, value: str) -> None:
    from syncnorm.transports.torch_distributed import timeout_from_env

    monkeypatch.setenv("SYNCNORM_TIMEOUT_S", value)
    with pytest.raises(ValueError, match="SYNCNORM_TIMEOUT_S must be a positive number of seconds"):
        timeout_from_env()


def test_timeout_setting_is_read(monkeypatch) -> None:
    from syncnorm.transports.torch_distributed import DEFAULT_TIMEOUT_S, timeout_from_env

    monkeypatch.delenv("SYNCNORM_TIMEOUT_S", raising=False)
    assert timeout_from_env() == DEFAULT_TIMEOUT_S < 30 * 60
    monkeypatch.setenv("SYNCNORM_TIMEOUT_S", "2.5")
    assert timeout_from_env() == 2.5
