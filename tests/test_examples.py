"""Keep the examples honest without a cluster: every YAML parses and is a valid object of its
kind, the DaemonSet's command line is accepted by `userproxy run`, its config loads, its RBAC
covers exactly the API calls the code makes, and the container build context is complete."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client

from userproxy import config
from userproxy.durations import parse_duration
from userproxy.sources import kube

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
KIND = EXAMPLES / "kind"
YAML_FILES = sorted(p for p in EXAMPLES.rglob("*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kubernetes_objects() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in YAML_FILES:
        for doc in documents(path):
            if "kind" in doc and doc.get("apiVersion", "").split("/")[-1] == "v1":
                out.append((f"{path.relative_to(ROOT)}:{doc['kind']}", doc))
    return out


def _model(doc: dict[str, Any]) -> str:
    return "V1" + doc["kind"]


class _Response:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.data = json.dumps(doc)


def _pruned(value: Any) -> Any:
    """Drop empty values, which the models leave out when they serialise."""
    if isinstance(value, dict):
        pruned = {k: _pruned(v) for k, v in value.items()}
        return {k: v for k, v in pruned.items() if v not in (None, {}, [])}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def test_every_example_yaml_parses() -> None:
    assert YAML_FILES, "no examples found"
    for path in YAML_FILES:
        assert documents(path), f"{path} is empty"


@pytest.mark.parametrize(("where", "doc"), kubernetes_objects(), ids=lambda v: str(v)[:60])
async def test_objects_are_valid_for_their_kind(where: str, doc: dict[str, Any]) -> None:
    """Deserialised with kubernetes-asyncio's models (required fields checked) and serialised
    back unchanged: a misspelt or misplaced field would be dropped and show up here."""
    if doc["kind"] == "KubeProxyConfiguration":
        config.load(yaml.safe_dump(doc), source=where)
        return
    async with client.ApiClient() as api:
        model = api.deserialize(_Response(doc), _model(doc))
        assert _pruned(api.sanitize_for_serialization(model)) == _pruned(doc), where


def test_the_kind_cluster_runs_without_kube_proxy() -> None:
    (cluster,) = documents(KIND / "cluster.yaml")
    assert cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4" and cluster["kind"] == "Cluster"
    assert cluster["networking"]["kubeProxyMode"] == "none"
    assert {n["role"] for n in cluster["nodes"]} <= {"control-plane", "worker"}


def objects_by_kind() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in documents(KIND / "userproxy.yaml")}


def daemonset_command() -> list[str]:
    container = objects_by_kind()["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    return list(container["command"])


def test_rbac_grants_exactly_the_calls_the_code_makes() -> None:
    objs = objects_by_kind()
    granted = {
        (group, resource, verb)
        for rule in objs["ClusterRole"]["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == set(kube.api_calls(use_endpoints="--use-endpoints" in daemonset_command()))
    binding = objs["ClusterRoleBinding"]
    account = objs["ServiceAccount"]["metadata"]
    assert binding["roleRef"]["name"] == objs["ClusterRole"]["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]


def test_the_configmap_config_loads_and_matches_the_example() -> None:
    embedded = objects_by_kind()["ConfigMap"]["data"]["config.conf"]
    assert config.load(embedded) == config.load(
        (EXAMPLES / "config" / "kube-proxy.yaml").read_text()
    )


def test_the_daemonset_command_line_is_accepted(tmp_path: Path) -> None:
    """Parse only: `--write-config-to` makes `userproxy run` check every flag and the config
    file, write the effective configuration and exit."""
    conf = tmp_path / "config.conf"
    conf.write_text(objects_by_kind()["ConfigMap"]["data"]["config.conf"])
    args = [
        re.sub(r"\$\(NODE_NAME\)", "kind-worker", a).replace(
            "/var/lib/userproxy/config.conf", str(conf)
        )
        for a in daemonset_command()
    ]
    assert args[:2] == ["userproxy", "run"]
    written = tmp_path / "effective.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "userproxy", *args[1:], "--write-config-to", str(written)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(written.read_text())["hostnameOverride"] == "kind-worker"


def test_the_daemonset_follows_kube_proxys_conventions() -> None:
    ds = objects_by_kind()["DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert pod["serviceAccountName"] == objects_by_kind()["ServiceAccount"]["metadata"]["name"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    security = container["securityContext"]
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    lock = volumes[mounts["/run/xtables.lock"]]["hostPath"]
    assert lock == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    instance = volumes[mounts["/run/userproxy"]]["hostPath"]
    assert instance == {"path": "/run/userproxy", "type": "DirectoryOrCreate"}
    options = config.load(objects_by_kind()["ConfigMap"]["data"]["config.conf"])
    health_port = int(options["healthz_bind_address"].rsplit(":", 1)[1])
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": health_port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": health_port}


def test_the_container_build_context_is_complete(tmp_path: Path) -> None:
    """Copy exactly what the Containerfile copies and build the package from it."""
    steps = re.findall(r"^COPY (?!--from)(.+) (\S+)$", (KIND / "Containerfile").read_text(), re.M)
    context = tmp_path / "src"
    context.mkdir()
    for sources, target in steps:
        for source in sources.split():
            src = ROOT / source
            dest = context / (
                src.name
                if target.endswith("/") and target == "/src/"
                else Path(target).relative_to("/src")
            )
            if src.is_dir():
                shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(src, dest)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(tmp_path),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.glob("userproxy-*.whl"))


def test_the_daemonset_rolls_out_by_hand_over() -> None:
    ds = objects_by_kind()["DaemonSet"]
    rolling = ds["spec"]["updateStrategy"]["rollingUpdate"]
    assert rolling == {"maxSurge": 1, "maxUnavailable": 0}  # the new pod beside the old
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "ports" not in container or all("hostPort" not in p for p in container["ports"])
    command = container["command"]
    flags = dict(arg.split("=", 1) for arg in command if arg.startswith("--") and "=" in arg)
    assert "--linger-after-handover" in container["command"]
    waits = parse_duration(flags["--successor-wait"]) + parse_duration(flags["--drain-timeout"])
    assert pod["terminationGracePeriodSeconds"] > waits
