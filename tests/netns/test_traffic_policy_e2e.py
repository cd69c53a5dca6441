"""externalTrafficPolicy: Local in sealed namespaces, with the real `userproxy run`: traffic
from outside (NodePort, externalIP) goes only to this node's endpoints, and is dropped (not
refused) while there is none; the ClusterIP keeps using every endpoint."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.netns import topology as topo
from tests.netns.procs import start_backends, start_userproxy, stop_all
from tests.netns.test_portals_e2e import tcp
from userproxy.objects import endpoint_slice, service

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]
VIP, NODE_PORT = "10.96.0.70", 30097
HERE, ELSEWHERE = "node-a", "node-b"


def objects(local_pod: bool) -> list[dict[str, Any]]:
    svc = service("web", cluster_ip=VIP, type="NodePort", external_ips=[topo.NODE_IP],
                  ports=[{"name": "tcp", "port": 80, "nodePort": NODE_PORT}])  # fmt: skip
    svc["spec"]["externalTrafficPolicy"] = "Local"
    slices = [
        endpoint_slice("web", addresses=[topo.POD_IPS["pod2"]], ports=[("tcp", 8080)],
                       node_name=ELSEWHERE, name="web-b"),
    ]  # fmt: skip
    if local_pod:
        here = endpoint_slice("web", addresses=[topo.POD_IPS["pod1"]], ports=[("tcp", 8080)],
                              node_name=HERE, name="web-a")  # fmt: skip
        slices.append(here)
    return [svc, *slices]


MODES = {
    "userspace": (),
    "iptables mode": ("--proxy-mode", "iptables"),
    "nftables mode": ("--proxy-mode", "nftables"),
    "nftables portals": ("--portals-backend", "nftables"),
}


@pytest.fixture(params=list(MODES))
async def node(request: Any, tmp_path: Path) -> AsyncIterator[tuple[dict[str, str], Path]]:
    ns = topo.create()
    procs: list[Any] = []
    try:
        procs += await start_backends(ns)
        path = tmp_path / "svc.yaml"
        path.write_text(yaml.safe_dump_all(objects(local_pod=True)))
        procs.append(await start_userproxy(
            ns["node"], "--manifests", str(path), "--hostname-override", HERE,
            "--external-ip-cidrs", f"{topo.NODE_IP}/32", *MODES[request.param],
        ))  # fmt: skip
        yield ns, path
    finally:
        await stop_all(procs)
        topo.destroy(ns)


async def answers(netns: str, host: str, port: int, n: int = 10) -> set[str]:
    return {await tcp(netns, host, port) for _ in range(n)}


async def test_external_traffic_stays_on_this_node(node: tuple[dict[str, str], Path]) -> None:
    ns, path = node
    assert await answers(ns["ext"], topo.NODE_IP, NODE_PORT) == {"pod1"}  # NodePort
    assert await answers(ns["ext"], topo.NODE_IP, 80) == {"pod1"}  # externalIP
    # ClusterIP: every endpoint (iptables mode picks at random: enough tries to see both)
    assert await answers(ns["pod1"], VIP, 80, n=16) == {"pod1", "pod2"}

    path.write_text(yaml.safe_dump_all(objects(local_pod=False)))  # the local pod goes
    deadline = asyncio.get_running_loop().time() + 10
    while True:  # the manifest is re-read within a second, the rules follow
        try:
            await tcp(ns["ext"], topo.NODE_IP, NODE_PORT)
        except TimeoutError:
            break  # dropped: no answer at all, not a refusal
        except ConnectionRefusedError:
            pytest.fail("external traffic without a local endpoint must be dropped, not refused")
        except ConnectionResetError:
            pass  # accepted before the rules changed: the relay had nowhere to go
        assert asyncio.get_running_loop().time() < deadline, "external traffic still served"
        await asyncio.sleep(0.2)
    assert await answers(ns["pod1"], VIP, 80, n=3) == {"pod2"}  # cluster traffic still flows
