"""`--proxy-mode nftables` end to end in the sealed topology: the kernel moves the traffic
through `ip userproxy`. Pod, node and external clients to ClusterIP, NodePort, externalIP and
load-balancer IP, TCP and UDP; spread; affinity; refusal; endpoint changes under traffic; the
table deleted by someone else comes back; switching modes and cleanup leave nothing behind."""

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
from tests.netns.test_iptables_mode_e2e import established_flow_outlives_its_endpoint
from tests.netns.test_portals_e2e import PODS, tcp, udp
from userproxy.objects import endpoint_slice, service

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]
VIP, EMPTY_VIP, STICKY_VIP, LB_VIP, NODE_PORT = (
    "10.96.0.10", "10.96.0.11", "10.96.0.13", "10.96.0.14", 30080
)  # fmt: skip
LB_IP, EXTERNAL_IP = "10.96.100.1", "10.96.200.1"


def manifest(web_pods: list[str] | None = None) -> list[dict[str, Any]]:
    pods = web_pods if web_pods is not None else list(topo.POD_IPS)
    ports = [
        {"name": "tcp", "port": 80, "nodePort": NODE_PORT},
        {"name": "udp", "port": 80, "protocol": "UDP", "nodePort": NODE_PORT},
    ]
    every_pod = list(topo.POD_IPS.values())
    return [
        service("web", cluster_ip=VIP, type="NodePort", ports=ports),
        endpoint_slice(
            "web",
            addresses=[topo.POD_IPS[p] for p in pods],
            ports=[("tcp", 8080), ("udp", 8080, "UDP")],
        ),
        service("sticky", cluster_ip=STICKY_VIP, ports=[("tcp", 80)], session_affinity=True),
        endpoint_slice("sticky", addresses=every_pod, ports=[("tcp", 8080)]),
        service(
            "lb",
            cluster_ip=LB_VIP,
            type="LoadBalancer",
            ports=[("tcp", 80)],
            load_balancer_ips=[LB_IP],
            external_ips=[EXTERNAL_IP],
        ),
        endpoint_slice("lb", addresses=every_pod, ports=[("tcp", 8080)]),
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
        for routed in (LB_IP, EXTERNAL_IP):  # the outside reaches them through the node
            topo.run_in(ns["ext"], "ip", "route", "add", f"{routed}/32", "via", topo.NODE_IP)
        procs += await start_backends(ns)

        async def start(mode: str, *extra: str) -> asyncio.subprocess.Process:
            proxy = await start_userproxy(
                ns["node"], "--manifests", str(path), "--proxy-mode", mode,
                "--iptables-backend", "nft", "--iptables-min-sync-period", "0s", *extra,
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


def table(ns: dict[str, str]) -> str:
    return topo.run_in(ns["node"], "nft", "list", "ruleset")


def iptables(ns: dict[str, str]) -> str:
    return topo.run_in(ns["node"], "iptables-nft-save")


async def test_kernel_paths_spread_affinity_and_refusal(
    node: tuple[dict[str, str], Path, Start],
) -> None:
    ns, _, start = node
    await start("nftables")
    assert "table ip userproxy" in table(ns) and "KUBE-" not in iptables(ns)
    spread = Counter([await tcp(ns["pod1"], VIP, 80) for _ in range(200)])
    assert set(spread) == PODS and all(60 <= n <= 140 for n in spread.values()), spread
    paths = (
        ("node", VIP, 80),
        ("ext", topo.NODE_IP, NODE_PORT),
        ("pod2", topo.POD_GW, NODE_PORT),
        ("pod1", LB_IP, 80),
        ("ext", LB_IP, 80),
        ("node", LB_IP, 80),
        ("ext", EXTERNAL_IP, 80),
        ("pod2", EXTERNAL_IP, 80),
        ("node", EXTERNAL_IP, 80),
    )
    for netns, host, port in paths:
        assert {await tcp(ns[netns], host, port) for _ in range(16)} == PODS, (netns, host, port)
    assert await udp(ns["pod2"], VIP, 80) in PODS
    assert await udp(ns["node"], VIP, 80) in PODS
    assert await udp(ns["ext"], topo.NODE_IP, NODE_PORT) in PODS  # replies come back via the node
    sticky = {await tcp(ns["pod1"], STICKY_VIP, 80) for _ in range(20)}
    assert len(sticky) == 1  # ClientIP affinity
    for netns in ("pod1", "node"):
        with pytest.raises(ConnectionRefusedError):
            await tcp(ns[netns], EMPTY_VIP, 80)
    with pytest.raises(ConnectionRefusedError):  # a ClusterIP's other ports are refused
        await tcp(ns["pod1"], VIP, 81)
    printed = topo.run_in(ns["node"], sys.executable, "-m", "userproxy", "rules")
    assert "table ip userproxy" in printed and "service-ips" in printed
    shown = json.loads(topo.run_in(ns["node"], sys.executable, "-m", "userproxy", "ls", "--json"))
    assert shown["mode"] == "nftables"
    web = next(p for p in shown["service_ports"] if p["name"] == "default/web:tcp")
    assert {e["address"].split(":")[0] for e in web["endpoints"]} == set(topo.POD_IPS.values())


async def test_endpoint_changes_keep_established_flows(
    node: tuple[dict[str, str], Path, Start],
) -> None:
    ns, path, start = node
    await start("nftables")
    first = await established_flow_outlives_its_endpoint(ns, path, manifest)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5  # the removed endpoint's chain goes a second later
    while f"default/web/tcp/tcp__{topo.POD_IPS[first]}/8080" in table(ns):
        assert loop.time() < deadline, "the stale endpoint chain stays"
        await asyncio.sleep(0.3)


async def test_a_deleted_table_comes_back(node: tuple[dict[str, str], Path, Start]) -> None:
    ns, _, start = node
    await start("nftables", "--iptables-sync-period", "1s")
    assert await tcp(ns["pod1"], VIP, 80) in PODS
    topo.run_in(ns["node"], "nft", "delete", "table", "ip", "userproxy")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 6
    while "table ip userproxy" not in table(ns):
        assert loop.time() < deadline, "the full sync did not put the table back"
        await asyncio.sleep(0.2)
    assert {await tcp(ns["pod1"], VIP, 80) for _ in range(16)} == PODS


async def test_switching_modes_leaves_nothing_of_the_other(
    node: tuple[dict[str, str], Path, Start],
) -> None:
    ns, _, start = node
    proxy = await start("nftables")
    await stop(proxy)
    assert "table ip userproxy" in table(ns)  # the kernel keeps serving on exit
    assert await tcp(ns["pod1"], VIP, 80) in PODS
    for mode, present in (("iptables", "KUBE-SVC-"), ("userspace", "KUBE-PORTALS-CONTAINER")):
        proxy = await start(mode)
        assert "table ip userproxy " not in table(ns) and present in iptables(ns), mode
        assert {await tcp(ns["pod1"], VIP, 80) for _ in range(16)} == PODS, mode
        await stop(proxy)
        proxy = await start("nftables")
        assert "KUBE-" not in iptables(ns) and "table ip userproxy" in table(ns), mode
        assert {await tcp(ns["pod1"], VIP, 80) for _ in range(16)} == PODS, mode
        await stop(proxy)
    topo.run_in(ns["node"], sys.executable, "-m", "userproxy", "cleanup")
    assert "userproxy" not in table(ns) and "KUBE-" not in iptables(ns)


async def test_portal_backends_and_modes_switch_cleanly_after_a_crash(
    node: tuple[dict[str, str], Path, Start],
) -> None:
    """Killed processes leave their rules; whichever comes next removes every other kind."""
    ns, _, start = node
    steps = [
        (("userspace", "--portals-backend", "nftables"), "table ip userproxy-portals", ()),
        (("userspace", "--portals-backend", "iptables"), "KUBE-PORTALS-CONTAINER",
         ("userproxy-portals",)),
        (("nftables",), "table ip userproxy ", ("KUBE-", "userproxy-portals")),
        (("userspace", "--portals-backend", "nftables"), "table ip userproxy-portals",
         ("KUBE-", "table ip userproxy ")),
    ]  # fmt: skip
    for argv, present, absent in steps:
        proxy = await start(*argv)
        everything = table(ns) + iptables(ns)
        assert present in everything, argv
        assert not [a for a in absent if a in everything], (argv, everything)
        assert {await tcp(ns["pod1"], VIP, 80) for _ in range(16)} == PODS, argv
        proxy.kill()
        await proxy.wait()
    topo.run_in(ns["node"], sys.executable, "-m", "userproxy", "cleanup")
    assert "userproxy" not in table(ns) and "KUBE-" not in iptables(ns)
