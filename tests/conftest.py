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


def _prometheus_binary(name: str) -> str:
    """A missing binary skips, with how to install it; it fails where SYNCNORM_REQUIRE_PROMETHEUS=1 (CI)."""
    import os

    from tests.processes import REQUIRE_PROMETHEUS, MissingBinary, prometheus_binary

    try:
        return prometheus_binary(name)
    except MissingBinary as missing:
        if os.environ.get(REQUIRE_PROMETHEUS) == "1":
            pytest.fail(f"{missing} ({REQUIRE_PROMETHEUS}=1)")
        pytest.skip(str(missing))


@pytest.fixture(scope="session")
def promtool() -> str:
    return _prometheus_binary("promtool")


@pytest.fixture(scope="session")
def prometheus_server_binary() -> str:
    return _prometheus_binary("prometheus")
