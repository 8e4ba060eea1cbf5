from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.ranks import RankPool

_pools: dict[int, RankPool] = {}


@pytest.fixture(scope="session")
def rank_pools() -> Iterator[dict[int, RankPool]]:
    yield _pools
    for pool in _pools.values():
        pool.close()


@pytest.fixture
def ranks(rank_pools: dict[int, RankPool]):
    """``ranks(world_size)`` gives a live pool of that size (restarted after a failure)."""

    def get(world_size: int) -> RankPool:
        pool = rank_pools.get(world_size)
        if pool is None or not pool.alive:
            if pool is not None:
                pool.close(force=True)
            pool = rank_pools[world_size] = RankPool(world_size)
        return pool

    return get
