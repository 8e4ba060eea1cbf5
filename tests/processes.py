"""Real processes on loopback, for tests and ``scripts/render_dashboard.py``: the
``syncnorm coordinator`` command, a Prometheus server run from the repository's
``deploy/prometheus`` files, and the compose file's torchrun workers.

Every wait has a deadline; every process is the caller's to stop (``stop()``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from syncnorm.launch import free_loopback_port

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
REQUIRE_PROMETHEUS = "SYNCNORM_REQUIRE_PROMETHEUS"
"""Set to 1 (CI does) and a missing promtool or prometheus fails the tests instead of skipping them."""


class MissingBinary(RuntimeError):
    pass


def prometheus_binary(name: str) -> str:
    """The path of ``promtool`` or ``prometheus``; :class:`MissingBinary` says how to get it."""
    path = shutil.which(name)
    if path is None:
        raise MissingBinary(
            f"{name} is not on PATH: install Prometheus 2.42 or later (Debian/Ubuntu: apt-get install "
            "prometheus, which `bash scripts/install.sh dev` does where apt-get is available)"
        )
    return path


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass  # the group has ended


def stop(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Stop a process started here (each in a session and process group of its own), with
    whatever it started: SIGTERM to the group, SIGKILL after ``timeout_s``, and SIGKILL to
    anything of the group still there once the process has ended."""
    if process.poll() is None:
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait(timeout=timeout_s)
    _signal_group(process, signal.SIGKILL)


def start_coordinator_command(*extra: str) -> tuple[subprocess.Popen, int, int]:
    """``syncnorm coordinator`` on free loopback ports: ``(process, grpc_port, metrics_port)``."""
    process = subprocess.Popen(
        [sys.executable, "-m", "syncnorm", "coordinator", "--host", "127.0.0.1", "--grpc-port", "0",
         "--metrics-port", "0", *extra],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    line = process.stdout.readline()  # type: ignore[union-attr]
    match = re.search(r"gRPC on 127\.0\.0\.1:(\d+), metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
    if match is None:
        stop(process)
        raise RuntimeError(f"the coordinator did not start; it printed {line!r}")
    return process, int(match.group(1)), int(match.group(2))


@dataclass
class Prometheus:
    """A running Prometheus server and its HTTP API (``/api/v1``)."""

    process: subprocess.Popen
    port: int
    log: Path

    def api(self, path: str, deadline_s: float = 10.0, **params: object) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=deadline_s) as answer:
            body = json.loads(answer.read())
        if body["status"] != "success":
            raise RuntimeError(f"Prometheus answered {body} to {url}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's ``result`` (a vector: ``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        params: dict[str, object] = {"query": expr}
        if at is not None:
            params["time"] = at
        return self.api("query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[dict[str, Any]]:
        return self.api("query_range", query=expr, start=start, end=end, step=step_s)["result"]

    def stop(self) -> None:
        stop(self.process)

    def log_tail(self, characters: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-characters:]


def prometheus_config(metrics_port: int, interval_s: float = 1.0) -> dict[str, Any]:
    """``deploy/prometheus/prometheus.yml`` for a coordinator on this machine: the
    ``syncnorm`` job scrapes ``127.0.0.1:metrics_port``, scrapes and rule evaluations come
    every ``interval_s``, and the rule file is the repository's, unchanged (``for:`` too)."""
    import yaml

    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=f"{interval_s:g}s", evaluation_interval=f"{interval_s:g}s")
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "syncnorm"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    return config


def start_prometheus(workdir: Path, metrics_port: int, deadline_s: float = 30.0) -> Prometheus:
    """A Prometheus server on a free loopback port, its data and log in ``workdir``,
    scraping the coordinator at ``metrics_port``; returns once it is ready."""
    import yaml

    binary = prometheus_binary("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(metrics_port)))
    port = free_loopback_port()
    log = workdir / "prometheus.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    server = Prometheus(process, port, log)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    server.stop()
    raise TimeoutError(f"prometheus was not ready within {deadline_s} s:\n{server.log_tail()}")


def compose_worker_command() -> list[str]:
    """The torchrun command of docker-compose.yml's worker services (they share it)."""
    import yaml

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    commands = [s["command"] for name, s in sorted(services.items()) if name.startswith("worker-")]
    if len(commands) < 2 or any(c != commands[0] for c in commands):
        raise ValueError("docker-compose.yml's worker services should run one and the same command")
    return [str(word) for word in commands[0]]


def replace_option(command: list[str], option: str, value: str) -> list[str]:
    """``command`` with the value after ``option`` replaced (the option must be there)."""
    at = command.index(option)
    return [*command[: at + 1], value, *command[at + 2 :]]


def start_compose_workers(
    grpc_port: int,
    epochs: int,
    report_every: int,
    extra_train_args: tuple[str, ...] = (),
    log_dir: Path | None = None,
) -> list[subprocess.Popen]:
    """docker-compose.yml's two worker commands, as two torchrun agents on this machine: the
    rendezvous and the coordinator on loopback, fewer epochs, ``extra_train_args`` appended."""
    command = compose_worker_command()
    command = replace_option(command, "--rdzv-endpoint", f"127.0.0.1:{free_loopback_port()}")
    command = replace_option(command, "--coordinator", f"127.0.0.1:{grpc_port}")
    command = replace_option(command, "--epochs", str(epochs))
    command = replace_option(command, "--report-every", str(report_every))
    if command[0] != "torchrun":
        raise ValueError(f"expected a torchrun command, got {command[:3]}")
    # Both agents bind loopback only: the rendezvous host's address and Gloo's interface.
    launch = [sys.executable, "-m", "torch.distributed.run", "--local-addr", "127.0.0.1", *command[1:]]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    processes = []
    for agent in range(2):
        log = open(log_dir / f"worker-{agent}.log", "w") if log_dir else subprocess.DEVNULL
        try:
            processes.append(subprocess.Popen(
                [*launch, *extra_train_args], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                start_new_session=True,
            ))  # fmt: skip
        finally:
            if log_dir:
                log.close()  # type: ignore[union-attr]
    return processes
