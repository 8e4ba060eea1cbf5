"""The coordinator's definitions, checked on data where the answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from syncnorm.coordinator.analysis import (
    batch_size_mismatch_ratio,
    ema_update,
    log_var_ratios,
    merge_reports,
    recommend_batch_sizes,
    running_mean_spread,
    standardized_shift,
)


def test_merged_reports_are_the_statistics_of_the_concatenated_batches() -> None:
    torch.manual_seed(0)
    parts = [torch.randn(n, 5, dtype=torch.float64) * 2 + 3 for n in (8, 24, 1)]
    merged = merge_reports(
        torch.tensor([p.shape[0] for p in parts]),
        torch.stack([p.mean(0) for p in parts]),
        torch.stack([p.var(0, correction=0) for p in parts]),
    )
    everything = torch.cat(parts)
    torch.testing.assert_close(merged.mean, everything.mean(0))
    torch.testing.assert_close(merged.biased_var, everything.var(0, correction=0))


def stats_drift(worker_mean: torch.Tensor, global_mean: torch.Tensor, global_var: torch.Tensor) -> float:
    return float(standardized_shift(worker_mean, global_mean, global_var).mean())


def test_a_worker_shifted_by_k_global_stds_drifts_by_about_k() -> None:
    torch.manual_seed(1)
    rest = torch.randn(20000, 6, dtype=torch.float64)
    shifted = torch.randn(20000, 6, dtype=torch.float64) + 3.0
    variances = torch.stack([rest.var(0, correction=0), shifted.var(0, correction=0)])
    merged = merge_reports(
        torch.tensor([20000, 20000]), torch.stack([rest.mean(0), shifted.mean(0)]), variances
    )
    # The global std includes the shift itself: sqrt(1 + 1.5^2) for two equal halves.
    expected = 1.5 / math.sqrt(1 + 1.5**2)
    assert stats_drift(shifted.mean(0), merged.mean, merged.biased_var) == pytest.approx(expected, rel=0.02)
    assert stats_drift(rest.mean(0), rest.mean(0), rest.var(0)) == 0.0
    # against a large group whose statistics it barely moves, the shift reads ~k
    assert stats_drift(torch.full((6,), 3.0), torch.zeros(6), torch.ones(6)) == pytest.approx(3.0, rel=1e-4)


def test_log_var_ratio_of_twice_the_std_is_log_4() -> None:
    ratio = float(log_var_ratios(torch.full((3,), 4.0), torch.ones(3), eps=0).mean())
    assert ratio == pytest.approx(math.log(4))


@pytest.mark.parametrize(
    ("sizes", "ratio"), [([8, 24], 3.0), ([16, 16, 16], 1.0), ([0, 4], math.inf), ([], 1.0)]
)
def test_batch_size_mismatch_ratio(sizes: list[int], ratio: float) -> None:
    assert batch_size_mismatch_ratio(sizes) == ratio


def test_running_stats_divergence_is_zero_for_identical_buffers_and_reads_the_shift() -> None:
    def divergence(means: list[torch.Tensor]) -> float:
        return float(running_mean_spread(torch.stack(means), torch.ones(len(means), 4)).mean(1).max())

    assert divergence([torch.zeros(4), torch.zeros(4)]) == 0.0
    assert divergence([torch.zeros(4), torch.full((4,), 2.0)]) == pytest.approx(1.0, rel=1e-4)


def test_recommended_batch_sizes_follow_throughput_and_keep_the_global_batch() -> None:
    # worker b is 3x faster per sample: it should get 3x the batch
    sizes = recommend_batch_sizes({"a": 16, "b": 16}, {"a": 0.3, "b": 0.1})
    assert sizes == {"a": 8, "b": 24}
    resized = recommend_batch_sizes(
        {"a": 16, "b": 16, "c": 16}, {"a": 1.0, "b": 1.0, "c": 1.0}, global_batch=50
    )
    assert sum(resized.values()) == 50 and max(resized.values()) - min(resized.values()) <= 1
    assert recommend_batch_sizes({"a": 1, "b": 100}, {"a": 1.0, "b": 0.001}, global_batch=2) == {
        "a": 1,
        "b": 1,
    }
    with pytest.raises(ValueError, match="at least 1 sample each"):
        recommend_batch_sizes({"a": 1, "b": 1}, {"a": 1.0, "b": 1.0}, global_batch=1)


def test_ema_update_matches_the_torch_running_mean_rule() -> None:
    first = ema_update(None, torch.tensor([1.0]), 0.1)
    second = ema_update(first, torch.tensor([3.0]), 0.1)
    assert float(second) == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(None, torch.tensor([1.0]), 0.0)
