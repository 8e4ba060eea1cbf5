"""deploy/ray: the cluster-launcher YAML and the KubeRay RayJob parse, and the
syncnorm commands they run are valid for this version's command line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.commands import parse_syncnorm as _parse_syncnorm

yaml = pytest.importorskip("yaml")

RAY_DIR = Path(__file__).resolve().parents[1] / "deploy" / "ray"


def test_cluster_launcher_yaml_and_its_commands() -> None:
    text = (RAY_DIR / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    assert config["head_node_type"] in config["available_node_types"]
    assert config["docker"]["image"] == "syncnorm-ray:0.1.0"
    commands = re.findall(r'"(syncnorm train[^"]*)"', text)
    assert {_parse_syncnorm(c).transport for c in commands} == {"torch", "actor"}
    for command in commands:
        args = _parse_syncnorm(command)
        assert args.ray and args.address == "auto" and len(args.batch_sizes) == args.num_workers


def test_rayjob_manifest_runs_syncnorm_on_the_image_s_ray_version() -> None:
    job = yaml.safe_load((RAY_DIR / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    args = _parse_syncnorm(job["spec"]["entrypoint"])
    cluster = job["spec"]["rayClusterSpec"]
    replicas = cluster["workerGroupSpecs"][0]["replicas"]
    assert args.ray and args.num_workers == replicas == len(args.batch_sizes)
    base = re.search(r"FROM rayproject/ray:(\S+)-py311-cpu", (RAY_DIR / "Dockerfile").read_text())
    assert base and cluster["rayVersion"] == base.group(1)
    minimum = re.search(r'"ray\[train\]>=([\d.]+)"', (RAY_DIR.parents[1] / "pyproject.toml").read_text())
    assert minimum and _version(base.group(1)) >= _version(minimum.group(1))
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert {c["image"] for g in groups for c in g["template"]["spec"]["containers"]} == {"syncnorm-ray:0.1.0"}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))
