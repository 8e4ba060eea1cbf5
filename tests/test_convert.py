"""convert_sync_batchnorm / revert_sync_batchnorm and checkpoint interchange with torch BN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from syncnorm import SyncBatchNorm, convert_sync_batchnorm, name_layers, revert_sync_batchnorm


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict(
        {
            "flat": nn.BatchNorm1d(3),
            "image": nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=None)),
            "volume": nn.BatchNorm3d(2, affine=False),
            "synced": nn.SyncBatchNorm(5, eps=1e-3, track_running_stats=False),
        }
    )


def _train_a_little(model: nn.Module) -> None:
    model["flat"](torch.randn(6, 3))
    model["image"](torch.randn(2, 3, 3, 3))
    model["volume"](torch.randn(2, 2, 2, 2, 2))


def test_convert_replaces_every_batchnorm_and_keeps_state() -> None:
    model = _model()
    _train_a_little(model)
    model["image"].eval()
    model["flat"].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = {
        name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }

    converted = convert_sync_batchnorm(model)

    layers = {name: m for name, m in converted.named_modules() if isinstance(m, SyncBatchNorm)}
    assert set(layers) == set(originals)
    for name, layer in layers.items():
        source = originals[name]
        assert layer.layer_name == name
        assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (
            source.eps, source.momentum, source.affine, source.track_running_stats,
        )  # fmt: skip
        assert layer.training == source.training
        if source.affine:
            assert layer.weight is source.weight and layer.bias is source.bias
    assert not layers["flat"].weight.requires_grad
    assert not layers["image.1"].training
    after = converted.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert torch.equal(after[key], before[key])


def test_revert_restores_the_original_classes_and_checkpoints_load_both_ways() -> None:
    plain = _model()
    _train_a_little(plain)
    reference_state = {k: v.clone() for k, v in plain.state_dict().items()}
    sync = convert_sync_batchnorm(_model())
    sync.load_state_dict(reference_state)  # torch BN checkpoint -> syncnorm
    sync["synced"](torch.randn(3, 5, 2))  # a converted torch SyncBatchNorm reverts by the input it saw
    back = revert_sync_batchnorm(sync)
    assert type(back["flat"]) is nn.BatchNorm1d
    assert type(back["image"][1]) is nn.BatchNorm2d
    assert type(back["volume"]) is nn.BatchNorm3d
    assert type(back["synced"]) is nn.BatchNorm1d
    fresh = _model()
    fresh.load_state_dict(back.state_dict())  # syncnorm checkpoint -> torch BN
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, reference_state[key])


def test_revert_of_a_layer_built_directly_uses_the_input_it_saw() -> None:
    model = nn.Sequential(SyncBatchNorm(3))
    model(torch.randn(4, 3, 5))
    assert type(revert_sync_batchnorm(model)[0]) is nn.BatchNorm1d
    with pytest.raises(ValueError, match=r"pass cls=torch\.nn\.BatchNorm1d"):
        revert_sync_batchnorm(nn.Sequential(SyncBatchNorm(3)))
    assert (
        type(revert_sync_batchnorm(nn.Sequential(SyncBatchNorm(3)), cls=nn.BatchNorm3d)[0]) is nn.BatchNorm3d
    )


def test_converted_model_outputs_equal_torch_in_one_process() -> None:
    plain = _model()
    sync = convert_sync_batchnorm(_model())
    x = torch.randn(4, 3, 3, 3)
    assert torch.equal(sync["image"](x), plain["image"](x))
    assert torch.equal(sync["image"][1].running_var, plain["image"][1].running_var)


def test_convert_of_a_bare_layer_returns_the_new_layer() -> None:
    layer = convert_sync_batchnorm(nn.BatchNorm2d(4))
    assert isinstance(layer, SyncBatchNorm)


def test_name_layers_names_directly_built_layers() -> None:
    model = name_layers(nn.Sequential(nn.Linear(2, 3), SyncBatchNorm(3)))
    assert model[1].layer_name == "1"
    assert "layer_name='1'" in repr(model)
