"""`syncnorm train --norm switchable|batch-instance|group|layer`: the training loop with the
other norms; synchronized ones on uneven workers equal one process on the global batch."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

import syncnorm
from syncnorm.train import TrainConfig, train_worker
from syncnorm.train.loop import train_rank
from syncnorm.train.model import digits_cnn, norm_layer

BASE = TrainConfig(epochs=1, device="cpu", dtype="float64", progress=False, return_state=True)


@pytest.mark.parametrize("norm", ["switchable", "batch-instance"])
def test_uneven_workers_train_exactly_like_one_process(ranks, norm: str) -> None:
    config = replace(BASE, norm=norm, batch_sizes=(20, 0, 44))
    results = ranks(3).run(train_rank, config, timeout=240)
    reference = train_worker(replace(config, batch_sizes=(64,)))
    assert results[0].steps == reference.steps == 22
    assert results[0].test_accuracy == reference.test_accuracy
    for key, value in reference.state_dict.items():
        torch.testing.assert_close(results[0].state_dict[key], value, rtol=1e-9, atol=1e-9, msg=key)
    if norm == "batch-instance":
        rho = torch.cat([v for k, v in reference.state_dict.items() if k.endswith("rho")])
        assert float(rho.min()) >= 0.0 and float(rho.max()) <= 1.0


@pytest.mark.parametrize(
    ("norm", "layer_type"),
    [
        ("switchable", syncnorm.SyncSwitchableNorm2d),
        ("batch-instance", syncnorm.SyncBatchInstanceNorm2d),
        ("group", nn.GroupNorm),
        ("layer", nn.GroupNorm),
        ("local", nn.BatchNorm2d),
    ],
)
def test_norm_choices_build_their_layers(norm: str, layer_type: type) -> None:
    model = digits_cnn(norm_layer(norm))
    layers = [m for m in model.modules() if isinstance(m, layer_type)]
    assert [m.num_features if hasattr(m, "num_features") else m.num_channels for m in layers] == [16, 32, 64]
    if norm == "layer":
        assert all(m.num_groups == 1 for m in layers)
    if norm == "group":
        assert [m.num_groups for m in layers] == [8, 8, 8]


def test_batch_independent_norms_cannot_train_on_an_empty_worker_batch() -> None:
    with pytest.raises(ValueError, match="--norm group needs every worker's batch size >= 1"):
        replace(BASE, norm="group", batch_sizes=(4, 0)).sizes_for(2)
    with pytest.raises(ValueError, match="--norm must be one of"):
        replace(BASE, norm="instance").sizes_for(1)
    assert replace(BASE, norm="switchable", batch_sizes=(4, 0)).sizes_for(2) == (4, 0)
