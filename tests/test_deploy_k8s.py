"""deploy/k8s: the manifests validate against Kubernetes' own schemas, and fit together:
Service ports reach container ports, selectors select the pods, the ServiceMonitor scrapes the
metrics port, the training Job's torchrun and syncnorm commands parse and reach the
coordinator and the rendezvous pod, and the PrometheusRule carries syncnorm.rules.yml."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.commands import parse_syncnorm, parse_torchrun

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.30.0"  # gRPC probes are GA from 1.27, Indexed Jobs from 1.24


def _resources() -> dict[tuple[str, str], dict]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for resource in yaml.safe_load_all(path.read_text()):
            found[(resource["kind"], resource["metadata"]["name"])] = resource
    return found


RESOURCES = _resources()


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def _container(workload: dict) -> dict:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def test_core_resources_validate_against_the_kubernetes_schemas() -> None:
    import kubernetes_validate  # the dev extra's

    core = {key: r for key, r in RESOURCES.items() if not r["apiVersion"].startswith("monitoring.coreos.com")}
    assert {kind for kind, _ in core} == {"PersistentVolumeClaim", "Deployment", "Service", "Job"}
    for resource in core.values():
        kubernetes_validate.validate(resource, KUBERNETES, strict=True)  # raises on unknown or wrong fields


def test_coordinator_deployment_service_and_state_volume_fit_together() -> None:
    deployment = RESOURCES[("Deployment", "syncnorm-coordinator")]
    service = RESOURCES[("Service", "syncnorm-coordinator")]
    pod = deployment["spec"]["template"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    assert _selects(service["spec"]["selector"], pod["metadata"]["labels"])
    container = _container(deployment)
    args = parse_syncnorm(container["command"])
    assert args.command == "coordinator"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": args.grpc_port, "metrics": args.metrics_port}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]]
    assert container["readinessProbe"]["grpc"]["port"] == args.grpc_port  # the standard health service
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == args.state_dir
    (volume,) = pod["spec"]["volumes"]
    assert volume["name"] == mount["name"]
    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in RESOURCES
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"


def test_service_monitor_scrapes_the_coordinator_s_metrics_port() -> None:
    monitor = RESOURCES[("ServiceMonitor", "syncnorm-coordinator")]
    service = RESOURCES[("Service", "syncnorm-coordinator")]
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    metrics_port = parse_syncnorm(_container(RESOURCES[("Deployment", "syncnorm-coordinator")])["command"])
    assert port["port"] == metrics_port.metrics_port and endpoint["path"] == "/metrics"


def test_training_job_is_one_torchrun_run_reporting_to_the_coordinator() -> None:
    job = RESOURCES[("Job", "syncnorm-train")]
    headless = RESOURCES[("Service", "syncnorm-train")]
    spec, pod = job["spec"], job["spec"]["template"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert (
        headless["spec"]["clusterIP"] == "None" and pod["spec"]["subdomain"] == headless["metadata"]["name"]
    )
    assert _selects(headless["spec"]["selector"], pod["metadata"]["labels"])
    launch, train = parse_torchrun(_container(job)["command"])
    assert int(launch.nnodes) == spec["completions"] and int(launch.nproc_per_node) == 1
    host, port = launch.rdzv_endpoint.split(":")
    # Indexed Job pods are named <job>-<index>; index 0 hosts the rendezvous
    assert host == f"{job['metadata']['name']}-0.{headless['metadata']['name']}"
    assert int(port) in {p["containerPort"] for p in _container(job)["ports"]}
    assert train.command == "train" and len(train.batch_sizes) == spec["completions"]
    coordinator = RESOURCES[("Service", "syncnorm-coordinator")]
    grpc_port = {p["name"]: p["port"] for p in coordinator["spec"]["ports"]}["grpc"]
    assert train.coordinator == f"{coordinator['metadata']['name']}:{grpc_port}"
    images = {
        _container(RESOURCES[("Deployment", "syncnorm-coordinator")])["image"],
        _container(job)["image"],
    }
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert images == {compose["services"]["coordinator"]["image"]}


def test_prometheus_rule_carries_the_alert_rules_file() -> None:
    rule = RESOURCES[("PrometheusRule", "syncnorm")]
    rules_file = yaml.safe_load((ROOT / "deploy" / "prometheus" / "syncnorm.rules.yml").read_text())
    assert rule["spec"]["groups"] == rules_file["groups"], (
        "deploy/k8s/prometheusrule.yaml differs from deploy/prometheus/syncnorm.rules.yml: change both"
    )
