"""scikit-learn's digits (1,797 8x8 images, 10 classes; shipped with the package,
nothing is downloaded) and how a global batch is split over workers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Digits:
    train_x: Tensor  # (N, 1, 8, 8), float32, pixel values scaled to [0, 1]
    train_y: Tensor  # (N,), int64
    test_x: Tensor
    test_y: Tensor


def load_digits(seed: int) -> Digits:
    """The digits data with a stratified, seeded 80/20 train/test split."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        range(len(y)), test_size=TEST_FRACTION, random_state=seed, stratify=bunch.target
    )
    train, test = torch.tensor(train_idx), torch.tensor(test_idx)
    return Digits(x[train], y[train], x[test], y[test])


def steps_per_epoch(num_train: int, sizes: tuple[int, ...]) -> int:
    return num_train // sum(sizes)


def worker_batch(
    data: Digits, sizes: tuple[int, ...], rank: int, epoch: int, step: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Rank ``rank``'s slice of global batch ``step`` of ``epoch``.

    Every worker draws the same seeded permutation, takes global batch ``step``
    of ``sum(sizes)`` samples, and keeps its own consecutive ``sizes[rank]``:
    the workers' batches concatenated in rank order are exactly the batch one
    process would take, which is what makes runs comparable across world sizes.
    """
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    start = step * sum(sizes) + sum(sizes[:rank])
    idx = order[start : start + sizes[rank]]
    return data.train_x[idx], data.train_y[idx]
