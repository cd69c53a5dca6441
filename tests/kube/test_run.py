"""The real `userproxy run --kubeconfig` process against the fake API server: changes followed
within a second, the API server away for 10 s, a 410 in an open watch, health, metrics, logs."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakekube import FakeKube
from tests.helpers import TcpBackend, tcp_name
from userproxy.objects import endpoint_slice, service


class Running:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.log: list[dict[str, Any]] = []
        self.addresses: dict[str, str] = {}

    async def read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            event = json.loads(line)
            self.log.append(event)
            if event["event"] in ("Serving healthz.", "Serving metrics."):
                self.addresses[event["event"].split()[1].rstrip(".")] = event["address"]

    async def get(self, server: str, path: str) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{self.addresses[server]}{path}") as response,
        ):
            return response.status, await response.text()

    async def proxy_port(self, name: str) -> int | None:
        _, body = await self.get("metrics", "/status")
        for port in json.loads(body)["service_ports"]:
            if port["name"] == name:
                return int(port["proxy_port"])
        return None


@pytest.fixture
async def fake() -> AsyncIterator[FakeKube]:
    async with FakeKube() as f:
        yield f


@pytest.fixture
async def userproxy(fake: FakeKube, tmp_path: Path) -> AsyncIterator[Running]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "userproxy",
        "run",
        "--kubeconfig",
        str(fake.kubeconfig(tmp_path / "kubeconfig")),
        "--portals",
        "off",
        "--healthz-bind-address",
        "127.0.0.1:0",
        "--metrics-bind-address",
        "127.0.0.1:0",
        "--iptables-min-sync-period",
        "0s",
        "--log-format",
        "json",
        "-v",
        stderr=asyncio.subprocess.PIPE,
    )
    running = Running(proc)
    reader = asyncio.get_running_loop().create_task(running.read())
    yield running
    if proc.returncode is None:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    await reader


async def until(check: Any, timeout: float, what: str) -> float:
    """Poll the async `check` until true; returns how long it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not await check():
        assert loop.time() - started < timeout, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.02)
    return loop.time() - started


def reaches(proxy: Running, name: str, backend: str | None) -> Any:
    async def check() -> bool:
        port = await proxy.proxy_port(name)
        if backend is None:
            return port is None
        if port is None:
            return False
        try:
            return await tcp_name(port) == backend
        except OSError:
            return False

    return check


def slice_to(service_name: str, backend: TcpBackend) -> dict[str, Any]:
    return endpoint_slice(service_name, addresses=["127.0.0.1"], ports=[("http", backend.port)])


async def test_follows_the_api_through_outages(
    fake: FakeKube, userproxy: Running, backends: list[TcpBackend]
) -> None:
    pod1, pod2, pod3 = backends
    fake.apply(service("web", cluster_ip="10.96.0.10", ports=[("http", 80)]))
    fake.apply(slice_to("web", pod1))
    await until(lambda: _running(userproxy), 15, "startup")
    await until(reaches(userproxy, "default/web:http", "pod1"), 1, "the listed service")

    # Created, changed and deleted objects are proxied within a second.
    fake.apply(service("api", cluster_ip="10.96.0.11", ports=[("http", 80)]))
    fake.apply(slice_to("api", pod2))
    await until(reaches(userproxy, "default/api:http", "pod2"), 1, "a created service")
    fake.apply(slice_to("api", pod3))
    await until(reaches(userproxy, "default/api:http", "pod3"), 1, "changed endpoints")
    fake.delete("Service", "api")
    await until(reaches(userproxy, "default/api:http", None), 1, "a deleted service")

    # The API server goes away for 10 s; traffic and an open connection carry on.
    web_port = await userproxy.proxy_port("default/web:http")
    assert web_port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", web_port)
    assert await reader.readline() == b"pod1\n"
    port = fake.port
    await fake.stop()
    fake.apply(slice_to("web", pod2))  # changed while away
    fake.apply(service("late", cluster_ip="10.96.0.12", ports=[("http", 80)]))
    for _ in range(5):
        await asyncio.sleep(2)
        assert await tcp_name(web_port) == "pod1"  # the last known state is served
    writer.write(b"ping\n")
    assert await reader.readline() == b"ping\n"
    await fake.start(port=port)
    try:
        await until(reaches(userproxy, "default/web:http", "pod2"), 10, "convergence")
        await until(lambda: _served(userproxy, "default/late:http"), 8, "a service added meanwhile")
        writer.write(b"pong\n")
        assert await reader.readline() == b"pong\n"
    finally:
        writer.close()

    # A 410 inside open watches, after changes they never saw: a relist finds them.
    blind = set(fake.watchers)
    fake.watchers.clear()
    fake.delete("Service", "late")
    fake.apply(slice_to("web", pod3))
    fake.compact()
    fake.watchers = blind
    fake.expire_watches()
    await until(reaches(userproxy, "default/web:http", "pod3"), 3, "relist after 410")
    await until(reaches(userproxy, "default/late:http", None), 1, "a deletion seen by relist")

    code, body = await userproxy.get("healthz", "/healthz")
    assert code == 200 and json.loads(body)["lastUpdated"]
    _, text = await userproxy.get("metrics", "/metrics")
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["kubeproxy_sync_proxy_rules_service_changes_total"] >= 4
    assert samples["kubeproxy_sync_proxy_rules_last_timestamp_seconds"] > 1e9
    assert any(e["event"].startswith("Lost the connection") for e in userproxy.log)
    assert any(e["event"] == "The watch expired; listing again." for e in userproxy.log)
    assert "s3cret-token" not in json.dumps(userproxy.log)  # credentials never logged


async def _running(proxy: Running) -> bool:
    return any(e["event"] == "userproxy is running." for e in proxy.log)


async def test_unreachable_api_at_startup_serves_nothing_and_reports_it(
    fake: FakeKube, userproxy: Running
) -> None:
    fake.fail_next("list", "services", 503, times=1000)
    await until(
        lambda: _has(userproxy, "Cannot list from the API server yet; retrying."), 15, "log"
    )
    assert not await _running(userproxy)
    fake.faults.clear()
    await until(lambda: _running(userproxy), 10, "startup once the API answers")


async def _served(proxy: Running, name: str) -> bool:
    return await proxy.proxy_port(name) is not None


async def _has(proxy: Running, event: str) -> bool:
    return any(e["event"] == event for e in proxy.log)
