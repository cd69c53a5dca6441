"""Dual-stack end to end in sealed namespaces: the real `userproxy run` serves one Service in
both families, through iptables and ip6tables portals (both backends): pods, the node and an
external client reach the IPv4 and the IPv6 ClusterIP, NodePort and externalIP, TCP and UDP
(replies checked against the address the client sent to), and a service without endpoints is
refused in both families."""

from __future__ import annotations

import asyncio
import os
import socket
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
VIP, VIP6 = "10.96.0.40", "fd00:96::40"
EMPTY_VIP, EMPTY_VIP6 = "10.96.0.41", "fd00:96::41"
NODE_PORT = 30095
PODS = set(topo.POD_IPS)


def manifest() -> list[dict[str, Any]]:
    web = service(
        "web",
        cluster_ip=VIP,
        cluster_ips=[VIP, VIP6],
        type="NodePort",
        external_ips=[topo.NODE_IP6],
        ports=[
            {"name": "tcp", "port": 80, "nodePort": NODE_PORT},
            {"name": "udp", "port": 80, "protocol": "UDP"},
        ],
    )
    ports = [("tcp", 8080), ("udp", 8080, "UDP")]
    return [
        web,
        endpoint_slice("web", addresses=list(topo.POD_IPS.values()), ports=ports, name="web-4"),
        endpoint_slice("web", addresses=list(topo.POD_IPS6.values()), ports=ports, name="web-6"),
        service(
            "empty", cluster_ip=EMPTY_VIP6, cluster_ips=[EMPTY_VIP6, EMPTY_VIP], ports=[("tcp", 80)]
        ),
    ]


SETUPS = {
    "userspace legacy": ("--iptables-backend", "legacy"),
    "userspace nft": ("--iptables-backend", "nft"),
    "iptables mode": ("--iptables-backend", "nft", "--proxy-mode", "iptables"),
    "nftables mode": ("--proxy-mode", "nftables"),
    "nftables portals": ("--portals-backend", "nftables"),
    "userspace bound to ::": ("--iptables-backend", "nft", "--bind-address", "::"),
}


@pytest.fixture(params=list(SETUPS))
async def node(request: Any, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    ns = topo.create()
    procs: list[Any] = []
    try:
        procs += await start_backends(ns)
        path = tmp_path / "svc.yaml"
        path.write_text(yaml.safe_dump_all(manifest()))
        proxy_ports: dict[str, int] = {}

        def note(event: dict[str, Any]) -> None:
            if "proxy_port" in event and ":" in event.get("cluster_ip", ""):
                proxy_ports[f"{event['service']}/{event['protocol']}"] = event["proxy_port"]

        procs.append(
            await start_userproxy(
                ns["node"],
                "--manifests",
                str(path),
                *SETUPS[request.param],
                "--external-ip-cidrs",
                f"{topo.NODE_IP6}/128",
                on_event=note,
            )
        )
        tcp_port = proxy_ports.get("default/web:tcp/TCP")
        yield {**ns, "setup": request.param, "proxy_port6": str(tcp_port or "")}
    finally:
        await stop_all(procs)
        topo.destroy(ns)


def family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def udp(netns: str, host: str, port: int) -> str:
    loop = asyncio.get_running_loop()
    sock = topo.socket_in(netns, socket.SOCK_DGRAM, family(host))
    try:
        sock.connect((host, port))  # only replies from host:port are accepted
        for _ in range(3):
            await loop.sock_sendall(sock, b"hi")
            try:
                return (await asyncio.wait_for(loop.sock_recv(sock, 100), 1)).decode().strip()
            except TimeoutError:
                continue
        raise TimeoutError(f"no UDP answer from {host}:{port}")
    finally:
        sock.close()


async def test_every_path_in_both_families(node: dict[str, str]) -> None:
    paths = [
        ("pod1", VIP), ("pod1", VIP6), ("node", VIP), ("node", VIP6),
        ("pod2", topo.NODE_IP6),  # the IPv6 externalIP
    ]  # fmt: skip
    for netns, host in paths:
        got = {await tcp(node[netns], host, 80) for _ in range(12)}
        assert got == PODS, (netns, host, "tcp")  # both pods (iptables mode picks at random)
        assert await udp(node[netns], host, 80) in PODS, (netns, host, "udp")
    for host in (topo.NODE_IP, topo.NODE_IP6):
        assert await tcp(node["ext"], host, NODE_PORT) in PODS, (host, "NodePort")


async def test_ipv6_proxy_ports_are_no_back_door(node: dict[str, str]) -> None:
    """A client outside the node that dials the IPv6 proxy port directly (not through a
    portal) is refused, as for IPv4."""
    if not node["proxy_port6"]:
        pytest.skip("the kernel serves: no proxy port")
    with pytest.raises((ConnectionRefusedError, TimeoutError)):
        await tcp(node["ext"], topo.NODE_IP6, int(node["proxy_port6"]))


async def test_no_endpoints_is_refused_in_both_families(node: dict[str, str]) -> None:
    for host in (EMPTY_VIP, EMPTY_VIP6):
        with pytest.raises(ConnectionRefusedError):
            await tcp(node["pod1"], host, 80)


async def test_ip6tables_holds_the_rules(node: dict[str, str]) -> None:
    if node["setup"].startswith("nftables"):
        tables = topo.run_in(node["node"], "nft", "list", "ruleset")
        table = "userproxy" if node["setup"] == "nftables mode" else "userproxy-portals"
        assert f"table ip6 {table} " in tables and f"table ip {table} " in tables
        assert f"{VIP6} . tcp . 80" in tables and "ip6 daddr != ::1" in tables
        return
    rules = topo.run_in(node["node"], "ip6tables-save") + topo.run_in(
        node["node"], "ip6tables-legacy-save"
    )
    assert f"-d {VIP6}/128" in rules and "icmp6-port-unreachable" in rules
    if node["setup"] == "iptables mode":
        assert "-j KUBE-SVC-" in rules and "[fd00:244::2]:8080" in rules
    else:
        assert "KUBE-NODEPORT-CONTAINER" in rules and "! -d ::1/128" in rules


CLIENTS6 = [f"fd00:244::{0x20 + i:x}" for i in range(8)]


async def test_two_workers_keep_ipv6_clients_affinity(tmp_path: Path) -> None:
    """With --workers 2, each IPv6 client address sticks to one pod (the reuseport program
    steers it to one process by its address, whose balancer holds the affinity)."""
    ns = topo.create()
    procs: list[Any] = []
    try:
        for address in CLIENTS6:
            topo.run_in(ns["pod1"], "ip", "addr", "add", f"{address}/64", "dev", "eth0", "nodad")
        procs += await start_backends(ns)
        vips = ["10.96.0.42", "fd00:96::42"]
        sticky = service("sticky", cluster_ip=vips[0], cluster_ips=vips, ports=[("tcp", 80)],
                         session_affinity=True)  # fmt: skip
        path = tmp_path / "svc.yaml"
        path.write_text(yaml.safe_dump_all([
            sticky,
            endpoint_slice("sticky", addresses=list(topo.POD_IPS6.values()),
                           ports=[("tcp", 8080)], name="sticky-6"),
        ]))  # fmt: skip
        ports: list[int] = []

        def note(event: dict[str, Any]) -> None:
            if event.get("cluster_ip") == vips[1]:
                ports.append(int(event["proxy_port"]))

        procs.append(await start_userproxy(
            ns["node"], "--manifests", str(path), "--workers", "2", on_event=note
        ))  # fmt: skip
        loop = asyncio.get_running_loop()
        # Until the worker holds the IPv6 proxy port too, the kernel has only the leader's
        # socket to pick: steering starts once both processes listen.
        deadline = loop.time() + 15
        while True:
            listening = await asyncio.to_thread(topo.run_in, ns["node"], "ss", "-Hltnp6")
            holders = [ln for ln in listening.splitlines() if f"]:{ports[0]} " in ln]
            if len(holders) >= 2:  # one listening socket per process
                break
            assert loop.time() < deadline, listening
            await asyncio.sleep(0.1)
        seen: dict[str, set[str]] = {}
        for address in CLIENTS6:
            for _ in range(6):
                sock = topo.socket_in(ns["pod1"], socket.SOCK_STREAM, socket.AF_INET6)
                try:
                    sock.bind((address, 0))
                    await asyncio.wait_for(loop.sock_connect(sock, ("fd00:96::42", 80)), 3)
                    answer = await asyncio.wait_for(loop.sock_recv(sock, 100), 3)
                finally:
                    sock.close()
                seen.setdefault(address, set()).add(answer.decode().strip())
        assert all(len(pods) == 1 for pods in seen.values()), seen
        assert set().union(*seen.values()) <= PODS
    finally:
        await stop_all(procs)
        topo.destroy(ns)
