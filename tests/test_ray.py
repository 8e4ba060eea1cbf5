"""The Ray actor transport on a real local Ray cluster (one per module, loopback only)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

# Read by Ray when it is imported: a single-node Ray on 127.0.0.1 only.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")

import syncnorm  # noqa: E402
from syncnorm.transports.ray_actor import ActorReducer, start_aggregator  # noqa: E402
from tests.cases import printed_accuracy as _accuracy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


SIZES = (3, 0, 5)
DTYPES = (torch.float32, torch.float32, torch.bfloat16)


def _global_batch(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(sum(SIZES), 4, 3, 3, generator=g) * 2 + 1
    return [p.to(dtype) for p, dtype in zip(torch.split(x, SIZES), DTYPES, strict=True)]


def _upstream(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return list(torch.split(torch.randn(sum(SIZES), 4, 3, 3, generator=g), SIZES))


@ray.remote(num_cpus=1)
def _actor_worker(aggregator: object, worker: int) -> dict[str, object]:
    torch.set_num_threads(1)
    reducer = ActorReducer(aggregator, worker, len(SIZES), run_id="equivalence", timeout_s=60)
    layer = syncnorm.SyncBatchNorm(4, reducer=reducer)
    outputs, grads = [], []
    for step in range(2):
        x = _global_batch(step)[worker].clone().requires_grad_(True)
        layer.weight.grad = None
        y = layer(x)
        y.backward(_upstream(step)[worker].to(y.dtype))
        outputs.append(y.detach())
        grads.append(x.grad)
    return {"outputs": outputs, "grads": grads, "mean": layer.running_mean, "var": layer.running_var,
            "weight_grad": layer.weight.grad}  # fmt: skip


def test_actor_transport_equals_batchnorm_on_the_concatenated_batch() -> None:
    aggregator = start_aggregator()
    results = ray.get([_actor_worker.remote(aggregator, w) for w in range(len(SIZES))], timeout=180)
    reference = torch.nn.BatchNorm2d(4)
    ref_outputs, ref_grads, ref_weight_grads = [], [], []
    for step in range(2):
        x = torch.cat([p.float() for p in _global_batch(step)]).requires_grad_(True)
        reference.weight.grad = None
        y = reference(x)
        # worker 2's output gradient is bf16, like its output
        y.backward(torch.cat([u.to(d).float() for u, d in zip(_upstream(step), DTYPES, strict=True)]))
        ref_outputs.append(torch.split(y.detach(), SIZES))
        ref_grads.append(torch.split(x.grad, SIZES))
        ref_weight_grads.append(reference.weight.grad.clone())
    for w, (result, dtype) in enumerate(zip(results, DTYPES, strict=True)):
        tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
        for step in range(2):
            assert result["outputs"][step].dtype == dtype
            torch.testing.assert_close(result["outputs"][step].float(), ref_outputs[step][w], **tol)
            torch.testing.assert_close(result["grads"][step].float(), ref_grads[step][w], **tol)
        torch.testing.assert_close(result["mean"], reference.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result["var"], reference.running_var, rtol=1e-5, atol=1e-5)
    summed = sum(r["weight_grad"] for r in results)
    torch.testing.assert_close(summed, ref_weight_grads[-1], rtol=1e-4, atol=1e-4)


def test_late_and_duplicated_messages_are_rejected() -> None:
    aggregator = start_aggregator()
    key = ("run", 0, "layer|2", "backward", 1)
    first = aggregator.reduce.remote(key, 0, 2, "sum", np.ones(2), 30.0)
    deadline = time.monotonic() + 30
    while ray.get(aggregator.stats.remote())["pending_rounds"] == 0:  # calls may start in any order
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(Exception, match="contributed twice"):
        ray.get(aggregator.reduce.remote(key, 0, 2, "sum", np.ones(2), 30.0))
    second = aggregator.reduce.remote(key, 1, 2, "sum", 2 * np.ones(2), 30.0)
    for _incarnation, total in ray.get([first, second], timeout=60):
        assert np.array_equal(total, np.full(2, 3.0))
    with pytest.raises(Exception, match="late or duplicated message for a finished round"):
        ray.get(aggregator.reduce.remote(key, 1, 2, "sum", np.ones(2), 30.0))
    other_run = ("other run", 0, "layer|2", "backward", 1)  # one actor serves several runs
    refs = [aggregator.reduce.remote(other_run, w, 2, "sum", np.ones(2), 30.0)
            for w in range(2)]  # fmt: skip
    assert all(np.array_equal(t, np.full(2, 2.0)) for _, t in ray.get(refs))
    stats = ray.get(aggregator.stats.remote())
    assert stats["rejected_duplicate"] == 1 and stats["rejected_late"] == 1 and stats["pending_rounds"] == 0


def test_a_missing_worker_fails_the_round_with_a_clear_timeout() -> None:
    aggregator = start_aggregator()
    layer = syncnorm.SyncBatchNorm(3, reducer=ActorReducer(aggregator, 0, 2, run_id="lonely", timeout_s=1.0))
    layer.layer_name = "stem.bn"
    with pytest.raises(syncnorm.SynchronizationError) as info:
        layer(torch.randn(4, 3))
    message = str(info.value)
    assert "'stem.bn'" in message and "timed out after 1 s waiting for workers [1]" in message
    assert "('lonely', 0, 'stem.bn|3', 'forward', 1)" in message


@ray.remote(num_cpus=1)
def _many_rounds(aggregator: object, worker: int, rounds: int) -> None:
    reducer = ActorReducer(aggregator, worker, 2, run_id="long", timeout_s=60)
    key = syncnorm.LayerKey("bn", 8)
    for _ in range(rounds):
        reducer.sum_across_workers(torch.ones(16), key)


def test_actor_memory_stays_bounded_over_many_rounds() -> None:
    aggregator = start_aggregator(finished_keys_kept=50)
    ray.get([_many_rounds.remote(aggregator, w, 300) for w in range(2)], timeout=300)
    stats = ray.get(aggregator.stats.remote())
    assert stats["pending_rounds"] == 0
    assert stats["finished_keys"] == 50


def test_an_aggregator_restart_fails_the_run_instead_of_giving_wrong_statistics() -> None:
    aggregator = start_aggregator(max_restarts=1)
    reducer = ActorReducer(aggregator, 0, 1, run_id="restart", timeout_s=10)
    key = syncnorm.LayerKey("bn", 2)
    reducer.sum_across_workers(torch.ones(4), key)
    ray.kill(aggregator, no_restart=False)
    with pytest.raises(syncnorm.SynchronizationError, match="restart"):
        for _ in range(20):  # calls during the restart fail too; none may succeed silently
            reducer.sum_across_workers(torch.ones(4), key)


@pytest.mark.parametrize("transport", ["actor", "torch"])
def test_train_on_ray_equals_one_process(transport: str, tmp_path: Path) -> None:
    common = ["--epochs", "1", "--dtype", "float64", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    on_ray = subprocess.run(
        [sys.executable, "-m", "syncnorm", "train", "--ray", "--num-workers", "2", "--transport", transport,
         "--batch-sizes", "8,24", "--checkpoint", str(tmp_path / "ray.pt"), *common],
        capture_output=True, text=True, timeout=400, cwd=ROOT, env=env,
    )  # fmt: skip
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, "-m", "syncnorm", "train", "--norm", "local", "--batch-sizes", "32",
         "--checkpoint", str(tmp_path / "one.pt"), *common],
        capture_output=True, text=True, timeout=200, cwd=ROOT,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    assert _accuracy(on_ray.stdout) == _accuracy(single.stdout)
    two, one = torch.load(tmp_path / "ray.pt"), torch.load(tmp_path / "one.pt")
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-9, atol=1e-9, msg=key)
