"""End to end with the API: the fake API server serves inside the sealed node namespace, the
real `userproxy run --kubeconfig` process follows it, and pods, the node and an external
client reach ClusterIPs and NodePorts as the API changes."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakekube import FakeKube
from tests.netns import topology as topo
from tests.netns.procs import start_backends, start_userproxy, stop_all
from tests.netns.test_portals_e2e import PODS, tcp, udp
from userproxy.objects import endpoint_slice, service

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]
VIP, API_VIP, NODE_PORT = "10.96.0.10", "10.96.0.20", 30090


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[dict[str, str], FakeKube]]:
    ns = topo.create()
    procs: list[asyncio.subprocess.Process] = []
    fake = FakeKube()
    try:
        sock = topo.socket_in(ns["node"])
        sock.bind(("127.0.0.1", 0))
        await fake.start(sock=sock)
        procs += await start_backends(ns)
        kubeconfig = str(fake.kubeconfig(tmp_path / "kubeconfig"))
        proxy = await start_userproxy(
            ns["node"], "--kubeconfig", kubeconfig, "--iptables-backend", "nft",
            "--iptables-min-sync-period", "100ms", "-v",
        )  # fmt: skip
        procs.append(proxy)
        yield ns, fake
    finally:
        await stop_all(procs)
        await fake.stop()
        topo.destroy(ns)


async def eventually(check: Any, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            if await check():
                return
        except (OSError, TimeoutError):
            pass
        assert loop.time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.1)


async def test_cluster_traffic_follows_the_api(cluster: tuple[dict[str, str], FakeKube]) -> None:
    ns, fake = cluster
    web = service(
        "web",
        cluster_ip=VIP,
        type="NodePort",
        ports=[
            {"name": "tcp", "port": 80, "nodePort": NODE_PORT},
            {"name": "udp", "port": 80, "protocol": "UDP", "nodePort": NODE_PORT},
        ],
    )
    fake.apply(web)
    fake.apply(
        endpoint_slice(
            "web",
            addresses=list(topo.POD_IPS.values()),
            ports=[("tcp", 8080), ("udp", 8080, "UDP")],
        )
    )

    async def spread(netns: str, host: str, port: int) -> bool:
        return {await tcp(ns[netns], host, port) for _ in range(4)} == PODS

    await eventually(lambda: spread("pod1", VIP, 80), 3, "pod -> ClusterIP")
    assert await spread("node", VIP, 80)
    assert await spread("ext", topo.NODE_IP, NODE_PORT)  # external -> NodePort
    assert await udp(ns["pod2"], VIP, 80) in PODS

    # A new Service and its slice appear in the API: traffic follows.
    fake.apply(service("api", cluster_ip=API_VIP, ports=[("http", 80)]))
    fake.apply(endpoint_slice("api", addresses=[topo.POD_IPS["pod2"]], ports=[("http", 8080)]))

    async def api_is(name: str) -> bool:
        return await tcp(ns["pod1"], API_VIP, 80) == name

    await eventually(lambda: api_is("pod2"), 10, "the new service")
    fake.apply(endpoint_slice("api", addresses=[topo.POD_IPS["pod1"]], ports=[("http", 8080)]))
    await eventually(lambda: api_is("pod1"), 3, "moved endpoints")

    # Endpoints gone: refused at once. Service gone: the VIP no longer answers.
    fake.delete("EndpointSlice", "api-slice")

    async def refused() -> bool:
        try:
            await tcp(ns["pod1"], API_VIP, 80)
        except ConnectionRefusedError:
            return True
        return False

    await eventually(refused, 3, "refusal without endpoints")
    fake.delete("Service", "api")

    async def unreachable() -> bool:
        try:
            await tcp(ns["pod1"], API_VIP, 80)
        except (TimeoutError, OSError):
            return True
        return False

    await eventually(unreachable, 10, "the deleted service's VIP to go")
    assert await spread("pod1", VIP, 80)  # everything else unaffected
