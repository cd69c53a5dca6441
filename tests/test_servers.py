"""Health, metrics and `userproxy ls` against a running proxy with real traffic."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import loopback_settings
from tests.helpers import TcpBackend, tcp_name, wait_for
from userproxy import UserProxy
from userproxy.model import ServicePort, ServicePortName
from userproxy.nftables_mode.provider import NftablesProvider
from userproxy.objects import endpoint_slice, service
from userproxy.serving.servers import Servers
from userproxy.testing.nftfake import FakeNftables
from userproxy.userspace.portals.interface import ActivePort

WEB = "default/web:http"


class HungPortals:
    """Portals whose rule writes hang until released, as a wedged iptables lock would."""

    def __init__(self) -> None:
        self.released = asyncio.Event()
        self.released.set()

    async def sync(self, active: Sequence[ActivePort]) -> None:
        await self.released.wait()

    async def port_removed(self, port: ServicePort) -> None:
        pass

    def node_port_errors(self) -> dict[ServicePortName, str]:
        return {}

    def handover_fds(self) -> list[tuple[str, int]]:
        return []

    async def close(self, *, keep_rules: bool = False) -> None:
        pass


@pytest.fixture
async def served(
    backends: list[TcpBackend],
) -> AsyncIterator[tuple[UserProxy, Servers, HungPortals]]:
    portals = HungPortals()
    proxy = UserProxy(loopback_settings(sync_period=0.5), portals=portals)
    servers = Servers(proxy, healthz_address="127.0.0.1:0", metrics_address="127.0.0.1:0")
    await servers.start()
    await proxy.start()
    await proxy.apply(
        service("web", cluster_ip="10.96.0.10", ports=[("http", 80)], session_affinity=True),
        endpoint_slice("web", addresses=["127.0.0.1"], ports=[("http", backends[0].port)]),
    )
    yield proxy, servers, portals
    portals.released.set()
    await proxy.stop()
    await servers.stop()


async def get(servers: Servers, server: str, path: str) -> tuple[int, str, dict[str, str]]:
    host, port = servers.bound[server]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{host}:{port}{path}") as response,
    ):
        return response.status, await response.text(), dict(response.headers)


async def test_healthz_turns_503_when_syncs_hang_and_200_when_they_resume(
    served: tuple[UserProxy, Servers, HungPortals],
) -> None:
    proxy, servers, portals = served
    code, body, headers = await get(servers, "healthz", "/healthz")
    assert code == 200 and headers["X-Content-Type-Options"] == "nosniff"
    assert set(json.loads(body)) == {"lastUpdated", "currentTime", "nodeEligible"}
    portals.released.clear()  # the next rule write hangs
    proxy.router.upsert(service("more", cluster_ip="10.96.0.11", ports=[("http", 80)]))
    proxy.runner.request()
    # Unhealthy once the update has waited longer than twice the 0.5 s sync period.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3
    while (await get(servers, "healthz", "/healthz"))[0] != 503:
        assert loop.time() < deadline, "healthz never turned 503"
        await asyncio.sleep(0.05)
    code, body, _ = await get(servers, "healthz", "/livez")
    assert code == 503 and "nodeEligible" not in json.loads(body)
    portals.released.set()
    await wait_for(lambda: proxy.runner.pending_since is None, 2, "the sync to finish")
    assert (await get(servers, "healthz", "/healthz"))[0] == 200
    metrics = await scrape(servers)
    assert metrics[("kubeproxy_proxy_healthz_total", (("code", "503"),))] == 1


async def scrape(servers: Servers) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, text, headers = await get(servers, "metrics", "/metrics")
    assert code == 200 and headers["Content-Type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_the_connections_a_test_made(
    served: tuple[UserProxy, Servers, HungPortals], backends: list[TcpBackend]
) -> None:
    proxy, servers, _ = served
    for _ in range(5):
        assert await tcp_name(proxy.proxy_port(WEB)) == "pod1"
    await wait_for(lambda: proxy.counters(WEB).active == 0, 2)
    m = await scrape(servers)
    labels = (("endpoint", f"127.0.0.1:{backends[0].port}"), ("protocol", "TCP"))
    key = (("service_port", WEB),)
    assert m[("userproxy_connections_total", tuple(sorted(labels + key)))] == 5
    assert m[("userproxy_connections_active", tuple(sorted(labels + key)))] == 0
    assert m[("userproxy_bytes_to_clients_total", tuple(sorted(labels + key)))] == 5 * len("pod1\n")
    assert m[("userproxy_endpoints", (("protocol", "TCP"), ("service_port", WEB)))] == 1
    assert m[("kubeproxy_sync_proxy_rules_duration_seconds_count", ())] >= 1
    assert m[("kubeproxy_sync_proxy_rules_last_timestamp_seconds", ())] > 1e9
    assert m[("kubeproxy_sync_proxy_rules_service_changes_total", ())] >= 1
    assert (await get(servers, "metrics", "/proxyMode"))[1] == "userspace"


def ls(servers: Servers, *args: str) -> str:
    host, port = servers.bound["metrics"]
    return subprocess.run(
        [sys.executable, "-m", "userproxy", "ls", "--address", f"{host}:{port}", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


async def test_ls_shows_service_ports_and_endpoint_connections(
    served: tuple[UserProxy, Servers, HungPortals], backends: list[TcpBackend]
) -> None:
    proxy, servers, _ = served
    held = [await asyncio.open_connection("127.0.0.1", proxy.proxy_port(WEB)) for _ in range(2)]
    for reader, _ in held:
        assert await reader.readline() == b"pod1\n"
    assert await tcp_name(proxy.proxy_port(WEB)) == "pod1"
    await wait_for(lambda: proxy.counters(WEB).total == 3 and proxy.counters(WEB).active == 2, 2)
    loop = asyncio.get_running_loop()
    text = await loop.run_in_executor(None, ls, servers)
    lines = text.splitlines()
    row = next(ln for ln in lines if WEB in ln)
    assert row.split()[:4] == ["TCP", "10.96.0.10:80", WEB, str(proxy.proxy_port(WEB))]
    assert "persistent 10800" in row
    endpoint = next(ln for ln in lines if ln.strip().startswith(f"-> 127.0.0.1:{backends[0].port}"))
    assert endpoint.split()[2:4] == ["2", "3"]  # active, total
    data: dict[str, Any] = json.loads(await loop.run_in_executor(None, ls, servers, "--json"))
    (port,) = data["service_ports"]
    assert port["endpoints"][0]["active"] == 2 and port["endpoints"][0]["total"] == 3
    for _, writer in held:
        writer.close()


def test_ls_explains_when_no_proxy_answers() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "userproxy", "ls", "--address", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 1 and "is userproxy running" in result.stderr


async def test_an_empty_address_disables_a_server() -> None:
    proxy = UserProxy(loopback_settings())
    servers = Servers(proxy, healthz_address="", metrics_address="127.0.0.1:0")
    await servers.start()
    try:
        assert set(servers.bound) == {"metrics"}
    finally:
        await servers.stop()


async def test_readyz_says_ready_only_after_the_first_sync() -> None:
    proxy = UserProxy(loopback_settings(sync_period=0.5))
    servers = Servers(proxy, healthz_address="127.0.0.1:0", metrics_address="")
    await servers.start()
    try:
        code, body, _ = await get(servers, "healthz", "/readyz")
        assert code == 503 and json.loads(body)["firstSyncDone"] is False
        await proxy.start()
        code, body, _ = await get(servers, "healthz", "/readyz")
        assert code == 200 and json.loads(body)["firstSyncDone"] is True
    finally:
        await proxy.stop()
        await servers.stop()


async def test_configz_speaks_kube_proxy_configuration_field_names() -> None:
    from userproxy.main import configz_document

    settings = loopback_settings(udp_idle_timeout=0.5)
    proxy = UserProxy(settings)
    servers = Servers(
        proxy, healthz_address="", metrics_address="127.0.0.1:0",
        configz=configz_document(settings),
    )  # fmt: skip
    await servers.start()
    try:
        code, body, _ = await get(servers, "metrics", "/configz")
        doc = json.loads(body)["kubeproxy.config.k8s.io"]
        assert code == 200 and doc["kind"] == "KubeProxyConfiguration"
        assert doc["udpIdleTimeout"] == "500ms" and doc["bindAddress"] == "127.0.0.1"
        assert doc["iptables"]["syncPeriod"] == "30s" and "udp_timeout" not in doc
    finally:
        await servers.stop()


async def test_nftables_mode_exports_upstreams_failure_counters() -> None:
    """`kubeproxy_sync_proxy_rules_nftables_{sync,cleanup}_failures_total`, as upstream names
    them, count what nft refused (here the fake, told to refuse the first transaction)."""
    nft = FakeNftables()
    nft.fail_next = "Error: Could not process rule: Cannot allocate memory"
    settings = loopback_settings(mode="nftables", sync_period=30.0)
    proxy = UserProxy(settings, provider=NftablesProvider(settings=settings, nft=nft))
    servers = Servers(proxy, healthz_address="", metrics_address="127.0.0.1:0")
    await servers.start()
    await proxy.start()
    try:
        await proxy.apply(
            service("web", cluster_ip="10.96.0.10", ports=[("http", 80)]),
            endpoint_slice("web", addresses=["10.244.0.2"], ports=[("http", 8080)]),
        )
        await wait_for(lambda: nft.exists(), 5)  # the runner retried after the refusal
        m = await scrape(servers)
        assert m[("kubeproxy_sync_proxy_rules_nftables_sync_failures_total", ())] == 1
        assert m[("kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total", ())] == 0
        assert (await get(servers, "metrics", "/proxyMode"))[1] == "nftables"
    finally:
        await proxy.stop()
        await servers.stop()
