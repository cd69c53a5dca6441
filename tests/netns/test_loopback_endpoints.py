"""An endpoint on the node's loopback (a manifest may name one; the API server never would)
is served to clients on the node only: a pod that reaches it through a ClusterIP would reach
the node's private listeners. The real `userproxy run` in sealed namespaces."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.netns import topology as topo
from tests.netns.procs import BACKEND, spawn, start_backends, start_userproxy, stop_all
from tests.netns.test_portals_e2e import tcp, udp
from userproxy.objects import endpoint_slice, service

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]
VIP, LOOPBACK_ONLY_VIP = "10.96.0.20", "10.96.0.21"
PORTS = [("tcp", 8080), ("udp", 8080, "UDP")]


def manifest() -> list[dict[str, Any]]:
    mixed = service("mixed", cluster_ip=VIP, ports=[("tcp", 80), ("udp", 80, "UDP")])
    only = service("only", cluster_ip=LOOPBACK_ONLY_VIP, ports=[("tcp", 80), ("udp", 80, "UDP")])
    return [
        mixed,
        endpoint_slice("mixed", addresses=["127.0.0.1", topo.POD_IPS["pod2"]], ports=PORTS),
        only,
        endpoint_slice("only", addresses=["127.0.0.1"], ports=PORTS),
    ]


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    ns = topo.create()
    procs = []
    try:
        procs = await start_backends(ns)
        on_node = await spawn(ns["node"], sys.executable, BACKEND, "node")
        procs.append(on_node)
        assert on_node.stdout is not None and await on_node.stdout.readline() == b"ready\n"
        path = tmp_path / "svc.yaml"
        path.write_text(yaml.safe_dump_all(manifest()))
        procs.append(await start_userproxy(ns["node"], "--manifests", str(path)))
        yield ns
    finally:
        await stop_all(procs)
        topo.destroy(ns)


async def test_pods_never_reach_a_loopback_endpoint(node: dict[str, str]) -> None:
    answers = {await tcp(node["pod1"], VIP, 80) for _ in range(6)}
    assert answers == {"pod2"}
    assert {await udp(node["pod1"], VIP, 80) for _ in range(4)} == {"pod2"}


async def test_the_node_itself_reaches_every_endpoint(node: dict[str, str]) -> None:
    answers = {await tcp(node["node"], VIP, 80) for _ in range(6)}
    assert answers == {"node", "pod2"}
    assert await tcp(node["node"], LOOPBACK_ONLY_VIP, 80) == "node"
    assert await udp(node["node"], LOOPBACK_ONLY_VIP, 80) == "node"


async def test_a_service_with_only_loopback_endpoints_refuses_pods(node: dict[str, str]) -> None:
    with pytest.raises((ConnectionError, TimeoutError, OSError)):
        await tcp(node["pod1"], LOOPBACK_ONLY_VIP, 80)
    with pytest.raises((ConnectionError, TimeoutError, OSError)):
        await udp(node["pod1"], LOOPBACK_ONLY_VIP, 80)
