"""convert_sync_batchnorm(model, to=...) into the norms of syncnorm.norms, and rho clipping."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import syncnorm
from syncnorm import (
    SyncBatchInstanceNorm2d,
    SyncBatchNorm,
    SyncConditionalBatchNorm2d,
    SyncMeanOnlyBatchNorm2d,
    SyncSwitchableNorm2d,
)

TARGETS = [SyncBatchInstanceNorm2d, SyncSwitchableNorm2d, SyncMeanOnlyBatchNorm2d, SyncConditionalBatchNorm2d]


def _trained_model() -> nn.Sequential:
    """A conv with BatchNorm2d whose parameters and buffers are not at their defaults,
    and a BatchNorm1d head that a 2-D conversion must leave alone."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4, eps=1e-3, momentum=0.3),
        nn.ReLU(),
        nn.Flatten(),
        nn.BatchNorm1d(4 * 9),
    )
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.normal_()
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(7)
    return model


def _options(target: type) -> dict:
    return {"num_conditions": 5} if target is SyncConditionalBatchNorm2d else {}


@pytest.mark.parametrize("target", TARGETS)
def test_converts_batchnorm2d_sharing_what_both_layers_have(target: type) -> None:
    model = _trained_model()
    source = model[1]
    converted = syncnorm.convert_sync_batchnorm(model, to=target, **_options(target))
    assert converted is model
    layer = model[1]
    assert type(layer) is target
    assert type(model[4]) is nn.BatchNorm1d, "a 2-D conversion must leave BatchNorm1d alone"
    assert layer.layer_name == "1"
    assert layer.momentum == 0.3 and layer.num_features == 4
    assert layer.running_mean is source.running_mean
    assert layer.num_batches_tracked is source.num_batches_tracked
    assert layer.training == source.training
    assert layer.bias is source.bias
    if target is SyncMeanOnlyBatchNorm2d:
        assert not hasattr(layer, "weight") and layer.running_var is None
        assert set(layer.state_dict()) == {"bias", "running_mean", "num_batches_tracked"}
    else:
        assert layer.weight is source.weight and layer.running_var is source.running_var
        assert layer.eps == 1e-3
    if target is SyncConditionalBatchNorm2d:
        assert layer.num_conditions == 5
    if target is SyncSwitchableNorm2d:
        assert all(
            abs(w - 1 / 3) < 1e-12 and abs(v - 1 / 3) < 1e-12 for w, v in layer.branch_weights().values()
        )


@pytest.mark.parametrize("target", [SyncBatchInstanceNorm2d, SyncConditionalBatchNorm2d])
@pytest.mark.parametrize("training", [True, False])
def test_batch_instance_and_conditional_start_as_the_batchnorm_they_replace(
    target: type, training: bool
) -> None:
    original = _trained_model()[1].train(training)
    converted = target.from_batchnorm(copy.deepcopy(original), **_options(target))
    x = torch.randn(6, 4, 3, 3) * 2 + 1
    expected = original(x)
    actual = converted(x) if target is SyncBatchInstanceNorm2d else converted(x, torch.arange(6) % 5)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(converted.running_mean, original.running_mean)
    torch.testing.assert_close(converted.running_var, original.running_var)


def test_a_syncbatchnorm_converted_from_batchnorm2d_converts_further() -> None:
    model = syncnorm.convert_sync_batchnorm(_trained_model())
    assert isinstance(model[1], SyncBatchNorm)
    weight = model[1].weight
    syncnorm.convert_sync_batchnorm(model, to=SyncSwitchableNorm2d)
    assert isinstance(model[1], SyncSwitchableNorm2d) and model[1].weight is weight
    assert isinstance(model[4], SyncBatchNorm), "the converted BatchNorm1d stays a SyncBatchNorm"


def test_a_batchnorm_module_itself_is_returned_converted() -> None:
    bn = nn.BatchNorm2d(3)
    converted = syncnorm.convert_sync_batchnorm(bn, to=SyncMeanOnlyBatchNorm2d)
    assert isinstance(converted, SyncMeanOnlyBatchNorm2d) and converted.bias is bn.bias


def test_reducer_and_process_group_are_passed_to_the_new_layers() -> None:
    reducer = _Nothing()
    model = syncnorm.convert_sync_batchnorm(_trained_model(), reducer=reducer, to=SyncSwitchableNorm2d)
    assert model[1].reducer is reducer and model[1].active_reducer() is reducer


class _Nothing(syncnorm.StatsReducer):
    def merge_moments(self, local: object, layer: object) -> object:
        raise AssertionError("not called")

    def sum_across_workers(self, local: object, layer: object) -> object:
        raise AssertionError("not called")


def test_a_failed_conversion_leaves_the_model_unchanged() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(nn.BatchNorm2d(3)))
    before = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match="num_conditions"):
        syncnorm.convert_sync_batchnorm(model, to=SyncConditionalBatchNorm2d)
    assert [type(m) for m in model.modules()] == before


@pytest.mark.parametrize(
    ("to", "options", "error", "expected"),
    [
        (nn.BatchNorm2d, {}, ValueError, "to= must be syncnorm.SyncBatchNorm or a layer from syncnorm.norms"),
        ("switchable", {}, ValueError, "to= must be syncnorm.SyncBatchNorm"),
        (SyncBatchNorm, {"num_conditions": 3}, TypeError, "takes no further options"),
    ],
)
def test_bad_conversion_targets_are_rejected(to: object, options: dict, error: type, expected: str) -> None:
    model = _trained_model()
    with pytest.raises(error, match=expected):
        syncnorm.convert_sync_batchnorm(model, to=to, **options)
    assert type(model[1]) is nn.BatchNorm2d


def test_rho_is_clipped_to_the_unit_interval_after_every_step() -> None:
    model = nn.Sequential(SyncBatchInstanceNorm2d(3), SyncBatchInstanceNorm2d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=100.0)
    handle = syncnorm.clip_rho_after_steps(optimizer, model)
    x = torch.randn(4, 3, 3, 3)
    for sign in (1.0, -1.0):
        optimizer.zero_grad()
        (sign * (model(x) * x).sum()).backward()  # a large step pushes rho far from [0, 1]
        optimizer.step()
        rho = torch.cat([model[0].rho, model[1].rho]).detach()
        assert float(rho.min()) >= 0.0 and float(rho.max()) <= 1.0
        assert float(rho.min()) == 0.0 or float(rho.max()) == 1.0, "the step did not reach a bound"
    handle.remove()
    optimizer.zero_grad()
    (-(model(x) * x).sum()).backward()
    optimizer.step()
    rho = torch.cat([model[0].rho, model[1].rho]).detach()
    assert float(rho.min()) < 0.0 or float(rho.max()) > 1.0, "removed hook still clipped"


def test_rho_clipping_needs_batch_instance_layers() -> None:
    model = nn.Sequential(SyncSwitchableNorm2d(3))
    with pytest.raises(ValueError, match="no SyncBatchInstanceNorm2d layers"):
        syncnorm.clip_rho_after_steps(torch.optim.SGD(model.parameters(), lr=0.1), model)


def test_a_deep_copy_is_a_different_layer_to_the_transports() -> None:
    layer = SyncSwitchableNorm2d(3)
    layer.layer_name = "block.norm"
    twin = copy.deepcopy(layer)
    assert twin.layer_key.name == "block.norm"
    assert twin.layer_key.instance != layer.layer_key.instance
    assert twin(torch.randn(4, 3, 2, 2)).shape == (4, 3, 2, 2)
