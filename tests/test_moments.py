"""The moment arithmetic against direct computation on the concatenated values."""

from __future__ import annotations

import pytest
import torch

from syncnorm.moments import (
    Moments,
    from_power_sums,
    local_moments,
    merge_into,
    merge_moments,
    to_power_sums,
    update_running_stats,
)


def _split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(x, sizes, dim=0))


@pytest.mark.parametrize("sizes", [[3, 5], [0, 7, 1], [1, 1], [4, 0, 0, 9, 2]])
def test_merge_equals_moments_of_concatenation(sizes: list[int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(sum(sizes), 6, 3, dtype=torch.float64) * 3 + 2
    parts = [local_moments(p, torch.float64) for p in _split(x, sizes)]
    merged = merge_moments(
        torch.stack([p.count for p in parts]),
        torch.stack([p.mean for p in parts]),
        torch.stack([p.m2 for p in parts]),
    )
    flat = x.transpose(0, 1).reshape(6, -1)
    assert float(merged.count) == flat.shape[1]
    torch.testing.assert_close(merged.mean, flat.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.biased_var, flat.var(1, correction=0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.unbiased_var, flat.var(1, correction=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("n_a", "n_b"), [(5, 9), (0, 4), (4, 0), (0, 0)])
def test_pairwise_merge_equals_moments_of_concatenation(n_a: int, n_b: int) -> None:
    a, b = torch.randn(n_a, 3, dtype=torch.float64) + 1e4, torch.randn(n_b, 3, dtype=torch.float64) * 2
    merged = local_moments(a, torch.float64)
    merge_into(merged, local_moments(b, torch.float64))
    both = torch.cat([a, b])
    assert float(merged.count) == n_a + n_b
    if n_a + n_b:
        torch.testing.assert_close(merged.mean, both.mean(0), rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(merged.biased_var, both.var(0, correction=0), rtol=1e-9, atol=1e-9)
    else:
        assert not merged.mean.any() and not merged.m2.any()


def test_merges_take_a_count_per_channel() -> None:
    """The coordinator lays layers of different counts side by side: channel j of
    worker i holds counts[i, j] values."""
    counts = torch.tensor([[3, 3, 0], [5, 5, 2]])
    data = [[torch.randn(int(counts[i, j]), dtype=torch.float64) for j in range(3)] for i in range(2)]
    moments = [[local_moments(v.view(-1, 1), torch.float64) for v in row] for row in data]
    means = torch.tensor([[float(m.mean[0]) for m in row] for row in moments], dtype=torch.float64)
    m2s = torch.tensor([[float(m.m2[0]) for m in row] for row in moments], dtype=torch.float64)
    merged = merge_moments(counts.double(), means, m2s)
    paired = Moments(counts[0].double(), means[0].clone(), m2s[0].clone())
    merge_into(paired, Moments(counts[1].double(), means[1], m2s[1]))
    for j in range(3):
        column = torch.cat([data[0][j], data[1][j]])
        for result in (merged, paired):
            assert float(result.count[j]) == column.numel()
            torch.testing.assert_close(result.mean[j], column.mean(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(result.biased_var[j], column.var(correction=0), rtol=1e-12, atol=1e-12)


def test_merge_of_nothing_is_empty() -> None:
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    merged = merge_moments(torch.zeros(2, dtype=torch.float64), zeros, zeros)
    assert float(merged.count) == 0
    assert torch.equal(merged.mean, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(merged.m2, torch.zeros(3, dtype=torch.float64))


def test_chan_merge_is_stable_where_power_sums_in_fp32_are_not() -> None:
    # fp32 values with mean 1e4 and std 1, split over 4 workers.
    torch.manual_seed(1)
    x = (torch.randn(4000, 2, dtype=torch.float64) + 1e4).float()
    reference = x.double().var(0, correction=0)
    parts = [local_moments(p, torch.float32) for p in torch.chunk(x, 4)]
    counts = torch.stack([p.count for p in parts])
    means = torch.stack([p.mean for p in parts])
    m2s = torch.stack([p.m2 for p in parts])
    merged = merge_moments(counts, means, m2s)
    assert torch.allclose(merged.biased_var.double(), reference, rtol=1e-3)
    # The textbook E[x^2] - E[x]^2 in fp32 is off by orders of magnitude here.
    naive = (x.square().mean(0) - x.mean(0).square()).double()
    assert not torch.allclose(naive, reference, rtol=0.5)


def test_power_sums_round_trip_in_float64() -> None:
    torch.manual_seed(2)
    x = (torch.randn(3000, 3, dtype=torch.float64) + 1e4).float()
    parts = [local_moments(p, torch.float32) for p in torch.chunk(x, 3)]
    sums = [to_power_sums(Moments(p.count.double(), p.mean.double(), p.m2.double())) for p in parts]
    total = from_power_sums(*(torch.stack(s).sum(0) for s in zip(*sums, strict=True)))
    torch.testing.assert_close(total.biased_var, x.double().var(0, correction=0), rtol=1e-3, atol=0)


def test_running_update_matches_torch_batchnorm() -> None:
    torch.manual_seed(3)
    bn = torch.nn.BatchNorm1d(5, momentum=0.3, dtype=torch.float64)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for _ in range(3):
        x = torch.randn(7, 5, dtype=torch.float64)
        bn(x)
        update_running_stats(rm, rv, local_moments(x, torch.float64), 0.3)
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-14, atol=1e-14)
