"""End to end in sealed network namespaces: the real `userproxy run --manifests` process in the
node namespace, backends in two pods, clients in pods, on the node and outside, both backends."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.netns import topology as topo
from tests.netns.procs import start_backends, start_userproxy, stop_all
from userproxy.objects import endpoint_slice, service

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]
VIP, EMPTY_VIP, LB_IP = "10.96.0.10", "10.96.0.11", "10.96.100.1"
TCP_NODE_PORT, UDP_NODE_PORT = 30080, 30081


def manifest() -> list[dict[str, Any]]:
    web = service(
        "web",
        cluster_ip=VIP,
        type="LoadBalancer",
        load_balancer_ips=[LB_IP],
        external_ips=[topo.NODE_IP],
        ports=[
            {"name": "tcp", "port": 80, "nodePort": TCP_NODE_PORT},
            {"name": "udp", "port": 80, "protocol": "UDP", "nodePort": UDP_NODE_PORT},
        ],
    )
    slice_ = endpoint_slice(
        "web", addresses=list(topo.POD_IPS.values()), ports=[("tcp", 8080), ("udp", 8080, "UDP")]
    )
    empty = service("empty", cluster_ip=EMPTY_VIP, ports=[("tcp", 80), ("udp", 80, "UDP")])
    return [web, slice_, empty]


@pytest.fixture
def net() -> Any:
    ns = topo.create()
    yield ns
    topo.destroy(ns)


@pytest.fixture
async def cluster(net: dict[str, str], tmp_path: Path, request: Any) -> AsyncIterator[Any]:
    procs = await start_backends(net)
    path = tmp_path / "svc.yaml"
    path.write_text(yaml.safe_dump_all(manifest()))
    ports: dict[str, int] = {}

    def note_port(event: dict[str, Any]) -> None:
        if "proxy_port" in event:
            ports[event["service"]] = event["proxy_port"]

    try:
        backend = (
            ("--portals-backend", "nftables")
            if request.param == "nftables"
            else ("--iptables-backend", request.param)
        )
        proxy = await start_userproxy(
            net["node"], "--manifests", str(path), *backend,
            "--iptables-sync-period", "2s", "-v",
            # The node's own address as an externalIP: refused unless allowed.
            "--external-ip-cidrs", f"{topo.NODE_IP}/32", on_event=note_port,
        )  # fmt: skip
        procs.append(proxy)
        yield net, ports, proxy, path
    finally:
        await stop_all(procs)


async def tcp(netns: str, host: str, port: int) -> str:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = topo.socket_in(netns, socket.SOCK_STREAM, family)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 3)
        return (await asyncio.wait_for(loop.sock_recv(sock, 100), 3)).decode().strip()
    finally:
        sock.close()


async def udp(netns: str, host: str, port: int) -> str:
    loop = asyncio.get_running_loop()
    sock = topo.socket_in(netns, socket.SOCK_DGRAM)
    try:
        sock.connect((host, port))  # connected: only replies from host:port are accepted
        await loop.sock_sendall(sock, b"hi")
        return (await asyncio.wait_for(loop.sock_recv(sock, 100), 3)).decode().strip()
    finally:
        sock.close()


#: The iptables portals on either variant, and the nftables portal table.
BACKENDS = pytest.mark.parametrize("cluster", ["legacy", "nft", "nftables"], indirect=True)
PODS = {"pod1", "pod2"}


@BACKENDS
async def test_every_portal_path_tcp_and_udp(cluster: Any) -> None:
    ns, _, _, _ = cluster
    paths = [
        ("pod1", VIP, 80),
        ("node", VIP, 80),  # ClusterIP from a pod and the node
        ("pod2", LB_IP, 80),
        ("node", LB_IP, 80),  # LoadBalancer ingress IP
        ("pod1", topo.NODE_IP, 80),
        ("ext", topo.NODE_IP, 80),  # externalIP (a node address)
    ]
    for netns, host, port in paths:
        got = {await tcp(ns[netns], host, port) for _ in range(4)}
        assert got == PODS, (netns, host, port, "tcp")  # round robin across both pods
        assert await udp(ns[netns], host, port) in PODS, (netns, host, port, "udp")
    node_ports = [
        ("ext", topo.NODE_IP),
        ("node", topo.NODE_IP),
        ("node", "127.0.0.1"),
        ("pod1", topo.POD_GW),
    ]
    for netns, host in node_ports:
        assert {await tcp(ns[netns], host, TCP_NODE_PORT) for _ in range(4)} == PODS, (netns, host)
        assert await udp(ns[netns], host, UDP_NODE_PORT) in PODS, (netns, host, "udp")


@BACKENDS
async def test_refusals_and_cleanup(cluster: Any) -> None:
    ns, ports, proxy, _ = cluster
    loop = asyncio.get_running_loop()
    started = loop.time()
    for netns in ("pod1", "node"):  # a service without endpoints is refused at once
        with pytest.raises(ConnectionRefusedError):
            await tcp(ns[netns], EMPTY_VIP, 80)
    assert loop.time() - started < 1
    # From outside the node, a proxy port cannot be reached directly.
    with pytest.raises((ConnectionRefusedError, TimeoutError)):
        await tcp(ns["ext"], topo.NODE_IP, ports["default/web:tcp"])
    saved = topo.run_in(ns["node"], sys.executable, "-m", "userproxy", "rules")
    assert (
        '--comment "default/web:tcp"' in saved
        or "--comment default/web:tcp" in saved
        or f"{VIP} . tcp . 80 : {ports['default/web:tcp']}" in saved
    ), saved
    proxy.terminate()
    assert await asyncio.wait_for(proxy.wait(), 10) == 0
    for tool in ("iptables-legacy-save", "iptables-nft-save"):
        assert "KUBE-" not in topo.run_in(ns["node"], tool)
    assert "userproxy" not in topo.run_in(ns["node"], "nft", "list", "tables")
    result = topo.run_in(ns["node"], sys.executable, "-m", "userproxy", "cleanup")
    assert result == ""


@BACKENDS
async def test_deleted_rule_heals_and_services_follow_the_manifest(cluster: Any) -> None:
    ns, _, _, path = cluster
    # Someone flushes our portal chain: the next full sync (the 2 s sync period) restores it.
    for tool in ("iptables-legacy", "iptables-nft"):
        topo.run_in(ns["node"], "sh", "-c", f"{tool} -t nat -F KUBE-PORTALS-CONTAINER || true")
    topo.run_in(ns["node"], "sh", "-c", "nft flush map ip userproxy-portals portals || true")
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        try:
            assert {await tcp(ns["pod1"], VIP, 80) for _ in range(2)} == PODS
            break
        except (TimeoutError, OSError):
            assert asyncio.get_running_loop().time() < deadline, "rules did not heal"
            await asyncio.sleep(0.2)
    # A manifest change is applied within the min sync period (a partial update).
    objs = manifest()
    objs[2]["spec"].update(clusterIP="10.96.0.12", clusterIPs=["10.96.0.12"])
    path.write_text(yaml.safe_dump_all(objs))
    deadline = asyncio.get_running_loop().time() + 5
    while "10.96.0.12" not in topo.run_in(ns["node"], sys.executable, "-m", "userproxy", "rules"):
        assert asyncio.get_running_loop().time() < deadline, "the change was not applied"
        await asyncio.sleep(0.1)
    # The moved no-endpoint service is refused at once, right after the rebuild: the filter
    # table (its REJECT) is committed before the nat table that sends clients to the new port.
    started = asyncio.get_running_loop().time()
    with pytest.raises(ConnectionRefusedError):
        await tcp(ns["pod1"], "10.96.0.12", 80)
    assert asyncio.get_running_loop().time() - started < 1
