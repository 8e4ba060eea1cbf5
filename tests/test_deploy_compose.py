"""docker-compose.yml and the Dockerfile, checked without a Docker engine: services, pinned
images, ports, mounts of files that exist, the workers' commands read by torchrun's and
syncnorm's own parsers, and Prometheus and Grafana wired to what the coordinator serves.
(tests/test_prometheus_e2e.py runs the workers' command and the Prometheus config for real.)"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.commands import parse_syncnorm, parse_torchrun

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
VERSION = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)


def _published(service: dict) -> dict[int, int]:
    """Container port -> host port; every published port is bound to the host's loopback."""
    ports = {}
    for entry in service.get("ports", []):
        host, published, container = entry.split(":")
        assert host == "127.0.0.1", f"{entry} is published beyond this machine"
        ports[int(container)] = int(published)
    return ports


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> host path or volume name."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_services_and_pinned_images() -> None:
    assert set(SERVICES) == {"coordinator", "worker-0", "worker-1", "prometheus", "grafana"}
    for name, service in SERVICES.items():
        image = service["image"]
        _, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), (
            f"{name}: {image} is not pinned"
        )
        if "build" in service:
            assert service["build"] == "." and image == f"syncnorm:{VERSION}"
    assert (ROOT / "Dockerfile").is_file()


def test_every_mounted_path_exists_and_every_volume_is_declared() -> None:
    for name, service in SERVICES.items():
        for source in _mounts(service).values():
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"
            else:
                assert source in COMPOSE["volumes"], f"{name} uses an undeclared volume {source}"


def test_coordinator_serves_on_the_ports_it_publishes_and_keeps_state_on_a_volume() -> None:
    coordinator = SERVICES["coordinator"]
    args = parse_syncnorm(coordinator["command"])
    assert args.command == "coordinator"
    assert set(_published(coordinator)) == {args.grpc_port, args.metrics_port}
    assert _mounts(coordinator)[args.state_dir] in COMPOSE["volumes"]
    assert f"127.0.0.1:{args.metrics_port}/metrics" in " ".join(coordinator["healthcheck"]["test"])


def test_workers_are_one_torchrun_job_reporting_to_the_coordinator() -> None:
    coordinator = parse_syncnorm(SERVICES["coordinator"]["command"])
    workers = {name: s for name, s in SERVICES.items() if name.startswith("worker-")}
    parsed = {name: parse_torchrun(s["command"]) for name, s in workers.items()}
    for name, (launch, train) in parsed.items():
        assert launch.rdzv_backend == "c10d" and int(launch.nnodes) == len(workers)
        assert int(launch.nproc_per_node) == 1
        host, port = launch.rdzv_endpoint.split(":")
        assert host in workers and workers[host]["hostname"] == host and int(port) > 0
        assert train.command == "train" and not train.ray and train.device == "cpu"
        assert len(train.batch_sizes) == len(workers) and len(set(train.batch_sizes)) > 1  # uneven
        assert train.coordinator == f"coordinator:{coordinator.grpc_port}"
        assert train.report_every >= 1 and train.run_id
        assert workers[name]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    assert len({(launch.rdzv_id, train.run_id) for launch, train in parsed.values()}) == 1


def test_prometheus_scrapes_the_coordinator_and_loads_the_rules() -> None:
    prometheus = SERVICES["prometheus"]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in prometheus["command"])
    config_dir, config_name = flags["config.file"].rsplit("/", 1)
    host_dir = ROOT / _mounts(prometheus)[config_dir]
    config = yaml.safe_load((host_dir / config_name).read_text())
    for rule_file in config["rule_files"]:
        assert (host_dir / rule_file).is_file()
    metrics_port = parse_syncnorm(SERVICES["coordinator"]["command"]).metrics_port
    (job,) = config["scrape_configs"]
    assert job["static_configs"] == [{"targets": [f"coordinator:{metrics_port}"]}]
    assert _mounts(prometheus)[flags["storage.tsdb.path"]] in COMPOSE["volumes"]
    assert 9090 in _published(prometheus)


def test_grafana_gets_the_provisioning_and_the_dashboard_where_the_provider_looks() -> None:
    grafana = SERVICES["grafana"]
    mounts = _mounts(grafana)
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "syncnorm.yml").read_text())["providers"]
    dashboards = ROOT / mounts[provider["options"]["path"]]
    assert (dashboards / "syncnorm.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == provider["options"]["path"] + "/syncnorm.json"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and 9090 in _published(SERVICES["prometheus"])
    assert 3000 in _published(grafana)


def test_dockerfile_installs_the_cpu_torch_of_install_sh_then_syncnorm() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)$", dockerfile, re.MULTILINE).group(1)
    assert re.fullmatch(r"python:3\.\d+-slim-\w+", base)
    torch = re.search(r"torch==(\S+) --index-url https://download\.pytorch\.org/whl/cpu", dockerfile)
    assert torch and f"torch=={torch.group(1)}" in (ROOT / "scripts" / "install.sh").read_text()
    assert dockerfile.index("torch==") < dockerfile.index("pip install --no-cache-dir .")
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), path
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"!pyproject.toml", "!README.md", "!syncnorm/"} <= set(ignored)
