"""`--proxy-mode iptables` end to end in the sealed topology: the kernel moves the traffic.
Pod, node and external clients; spread; affinity; refusal; endpoint changes under traffic;
`ls` from packet counters; switching modes leaves nothing of the other mode behind."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.netns import topology as topo
from tests.netns.procs import start_backends, start_userproxy, stop_all
from tests.netns.test_portals_e2e import PODS, tcp, udp
from userproxy.objects import endpoint_slice, service

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]
VIP, EMPTY_VIP, STICKY_VIP, NODE_PORT = "10.96.0.10", "10.96.0.11", "10.96.0.13", 30080


def manifest(web_pods: list[str] | None = None) -> list[dict[str, Any]]:
    pods = web_pods if web_pods is not None else list(topo.POD_IPS)
    ports = [
        {"name": "tcp", "port": 80, "nodePort": NODE_PORT},
        {"name": "udp", "port": 80, "protocol": "UDP", "nodePort": NODE_PORT},
    ]
    return [
        service("web", cluster_ip=VIP, type="NodePort", ports=ports),
        endpoint_slice(
            "web",
            addresses=[topo.POD_IPS[p] for p in pods],
            ports=[("tcp", 8080), ("udp", 8080, "UDP")],
        ),
        service("sticky", cluster_ip=STICKY_VIP, ports=[("tcp", 80)], session_affinity=True),
        endpoint_slice("sticky", addresses=list(topo.POD_IPS.values()), ports=[("tcp", 8080)]),
        service("empty", cluster_ip=EMPTY_VIP, ports=[("tcp", 80)]),
    ]


Start = Callable[..., Any]


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[dict[str, str], Path, Start]]:
    ns = topo.create()
    procs: list[asyncio.subprocess.Process] = []
    path = tmp_path / "svc.yaml"
    path.write_text(yaml.safe_dump_all(manifest()))
    try:
        procs += await start_backends(ns)

        async def start(mode: str) -> asyncio.subprocess.Process:
            proxy = await start_userproxy(
                ns["node"], "--manifests", str(path), "--proxy-mode", mode,
                "--iptables-backend", "nft", "--iptables-min-sync-period", "0s",
            )  # fmt: skip
            procs.append(proxy)
            return proxy

        yield ns, path, start
    finally:
        await stop_all(procs)
        topo.destroy(ns)


async def stop(proxy: asyncio.subprocess.Process) -> None:
    proxy.terminate()
    assert await asyncio.wait_for(proxy.wait(), 10) == 0


def saved(ns: dict[str, str]) -> str:
    return topo.run_in(ns["node"], "iptables-nft-save")


async def test_kernel_paths_spread_affinity_and_refusal(
    node: tuple[dict[str, str], Path, Start],
) -> None:
    ns, _, start = node
    await start("iptables")
    assert "KUBE-SVC-" in saved(ns) and "KUBE-PORTALS" not in saved(ns)
    spread = Counter([await tcp(ns["pod1"], VIP, 80) for _ in range(200)])
    assert set(spread) == PODS and all(60 <= n <= 140 for n in spread.values()), spread
    for netns, host, port in (("node", VIP, 80), ("ext", topo.NODE_IP, NODE_PORT),
                              ("pod2", topo.POD_GW, NODE_PORT)):  # fmt: skip
        assert {await tcp(ns[netns], host, port) for _ in range(16)} == PODS, (netns, host)
    assert await udp(ns["pod2"], VIP, 80) in PODS
    assert await udp(ns["ext"], topo.NODE_IP, NODE_PORT) in PODS  # replies come back via the node
    sticky = {await tcp(ns["pod1"], STICKY_VIP, 80) for _ in range(20)}
    assert len(sticky) == 1  # ClientIP affinity
    for netns in ("pod1", "node"):
        with pytest.raises(ConnectionRefusedError):
            await tcp(ns[netns], EMPTY_VIP, 80)
    printed = topo.run_in(ns["node"], sys.executable, "-m", "userproxy", "rules")
    assert "-A KUBE-NODEPORTS" in printed and "(iptables mode)" in printed
    shown = json.loads(topo.run_in(ns["node"], sys.executable, "-m", "userproxy", "ls", "--json"))
    assert shown["mode"] == "iptables"
    web = next(p for p in shown["service_ports"] if p["name"] == "default/web:tcp")
    assert sum(e["total"] for e in web["endpoints"]) >= 200 + 8 + 8 + 8


async def established_flow_outlives_its_endpoint(
    ns: dict[str, str], path: Path, manifest: Callable[[list[str]], list[dict[str, Any]]]
) -> str:
    """A pod's connection through the VIP; its endpoint leaves the Service. New connections
    stop reaching it within seconds; the established one keeps flowing (its conntrack entry
    still maps it). Returns the endpoint that left."""
    loop = asyncio.get_running_loop()
    sock = topo.socket_in(ns["pod1"])
    await asyncio.wait_for(loop.sock_connect(sock, (VIP, 80)), 3)
    first = (await asyncio.wait_for(loop.sock_recv(sock, 100), 3)).decode().strip()
    other = (PODS - {first}).pop()
    text = yaml.safe_dump_all(manifest([other]))
    await asyncio.to_thread(path.write_text, text)  # the connected pod leaves
    deadline = loop.time() + 5
    while {await tcp(ns["pod2"], VIP, 80) for _ in range(6)} != {other}:
        assert loop.time() < deadline, "new connections still reach the removed endpoint"
        await asyncio.sleep(0.2)
    await loop.sock_sendall(sock, b"still there\n")
    assert await asyncio.wait_for(loop.sock_recv(sock, 100), 3) == b"still there\n"
    sock.close()
    return first


async def test_endpoint_changes_keep_established_flows(
    node: tuple[dict[str, str], Path, Start],
) -> None:
    ns, path, start = node
    await start("iptables")
    await established_flow_outlives_its_endpoint(ns, path, manifest)


async def test_switching_modes_leaves_nothing_of_the_other(
    node: tuple[dict[str, str], Path, Start],
) -> None:
    ns, _, start = node
    proxy = await start("iptables")
    await stop(proxy)
    assert "KUBE-SVC-" in saved(ns)  # iptables mode leaves its rules serving on exit
    assert await tcp(ns["pod1"], VIP, 80) in PODS
    proxy = await start("userspace")
    rules = saved(ns)
    assert "KUBE-SVC-" not in rules and "KUBE-SERVICES" not in rules
    assert "KUBE-PORTALS-CONTAINER" in rules
    assert {await tcp(ns["pod1"], VIP, 80) for _ in range(16)} == PODS
    await stop(proxy)
    proxy = await start("iptables")
    assert "KUBE-PORTALS" not in saved(ns) and "KUBE-USERPROXY" in saved(ns)
    assert {await tcp(ns["pod1"], VIP, 80) for _ in range(16)} == PODS
    await stop(proxy)
    topo.run_in(ns["node"], sys.executable, "-m", "userproxy", "cleanup")
    assert "KUBE-" not in saved(ns)
