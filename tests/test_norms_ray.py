"""The synchronized norms over the Ray actor transport, against the papers' formulas on
the concatenated batch (one local Ray cluster for the module, loopback only)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# Read by Ray when it is imported: a single-node Ray on 127.0.0.1 only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")

from syncnorm.transports.ray_actor import ActorReducer, start_aggregator  # noqa: E402
from tests.norm_cases import (  # noqa: E402
    NormCase,
    NormTrace,
    assert_matches_reference,
    build_layer,
    run_layer,
    run_reference,
)


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=1)
def _actor_worker(aggregator: object, worker: int, case: NormCase) -> NormTrace:
    torch.set_num_threads(1)
    reducer = ActorReducer(aggregator, worker, case.world_size, run_id=case.kind, timeout_s=60)
    return run_layer(build_layer(case, reducer), case, worker)


@pytest.mark.parametrize(
    "case",
    [
        NormCase("switchable", sizes=(3, 0, 5), dtype=torch.float32),
        NormCase("conditional_vector", sizes=(2, 4, 0), dtype=torch.float64),
    ],
    ids=lambda c: f"{c.kind}-{c.dtype}",
)
def test_actor_transport_matches_the_paper_formula_on_the_concatenated_batch(case: NormCase) -> None:
    aggregator = start_aggregator()
    traces = ray.get([_actor_worker.remote(aggregator, w, case) for w in range(case.world_size)], timeout=180)
    assert_matches_reference(traces, run_reference(case), case)
