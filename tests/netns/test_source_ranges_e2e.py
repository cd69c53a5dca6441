"""loadBalancerSourceRanges in sealed namespaces, both modes: of two external clients, the one
inside the ranges reaches the load-balancer IP, the other gets nothing."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import yaml

from tests.netns import topology as topo
from tests.netns.procs import start_backends, start_userproxy, stop_all
from userproxy.objects import endpoint_slice, service

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]
LB_IP, ALLOWED, OTHER = "10.96.100.9", topo.EXT_IP, "192.168.50.3"


async def dial_from(ns: str, source: str) -> str:
    loop = asyncio.get_running_loop()
    sock = topo.socket_in(ns)
    try:
        sock.bind((source, 0))
        await asyncio.wait_for(loop.sock_connect(sock, (LB_IP, 80)), 2)
        return (await asyncio.wait_for(loop.sock_recv(sock, 100), 2)).decode().strip()
    finally:
        sock.close()


@pytest.mark.parametrize(
    "mode",
    [(), ("--proxy-mode", "iptables"), ("--proxy-mode", "nftables"),
     ("--portals-backend", "nftables")],
    ids=["userspace", "iptables", "nftables", "nftables-portals"],
)  # fmt: skip
async def test_only_sources_in_range_reach_the_load_balancer_ip(
    tmp_path: Path, mode: tuple[str, ...]
) -> None:
    ns = topo.create()
    procs = []
    try:
        topo.run_in(ns["ext"], "ip", "addr", "add", f"{OTHER}/24", "dev", "eth0")
        topo.run_in(ns["ext"], "ip", "route", "add", f"{LB_IP}/32", "via", topo.NODE_IP)
        procs += await start_backends(ns)
        lb = service("web", cluster_ip="10.96.0.80", type="LoadBalancer",
                     load_balancer_ips=[LB_IP], ports=[("http", 80)])  # fmt: skip
        lb["spec"]["loadBalancerSourceRanges"] = [f"{ALLOWED}/32"]
        pods = endpoint_slice("web", addresses=list(topo.POD_IPS.values()), ports=[("http", 8080)])
        path = tmp_path / "svc.yaml"
        path.write_text(yaml.safe_dump_all([lb, pods]))
        procs.append(await start_userproxy(ns["node"], "--manifests", str(path), *mode))
        assert await dial_from(ns["ext"], ALLOWED) in set(topo.POD_IPS)
        with pytest.raises((TimeoutError, OSError)):
            await dial_from(ns["ext"], OTHER)
    finally:
        await stop_all(procs)
        topo.destroy(ns)
