"""The Services' health-check servers (`healthCheckNodePort`), with a real HTTP client: the
answer follows this node's ready endpoints and the proxy's health, and ports open and close as
Services come and go."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conftest import loopback_settings
from userproxy import UserProxy
from userproxy.objects import endpoint_slice, service
from userproxy.serving.servicehealth import ServiceHealthServers

NODE = "node-a"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lb(port: int) -> dict[str, object]:
    obj = service("web", cluster_ip="10.96.0.10", ports=[("http", 80)], type="LoadBalancer")
    obj["spec"].update(externalTrafficPolicy="Local", healthCheckNodePort=port)  # type: ignore[attr-defined]
    return obj


@pytest.fixture
async def rig() -> AsyncIterator[tuple[UserProxy, ServiceHealthServers, dict[str, bool]]]:
    proxy = UserProxy(loopback_settings(node_name=NODE))
    healthy = {"proxy": True}
    checks = ServiceHealthServers(
        proxy_healthy=lambda: healthy["proxy"], addresses=lambda: ["127.0.0.1"]
    )
    await proxy.start()
    yield proxy, checks, healthy
    await checks.close()
    await proxy.stop()


async def get(port: int) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/anything") as response,
    ):
        return response.status, json.loads(await response.text())


async def test_the_answer_follows_local_endpoints_and_proxy_health(
    rig: tuple[UserProxy, ServiceHealthServers, dict[str, bool]],
) -> None:
    proxy, checks, healthy = rig
    port = free_port()
    elsewhere = endpoint_slice(
        "web", addresses=["10.244.1.5"], ports=[("http", 8080)], node_name="node-b"
    )
    await proxy.apply(lb(port), elsewhere)
    await checks.update(proxy.status())
    code, body = await get(port)
    assert code == 503 and body == {
        "service": {"namespace": "default", "name": "web"},
        "localEndpoints": 0,
        "serviceProxyHealthy": True,
    }
    await proxy.apply(endpoint_slice("web", addresses=["10.244.0.5", "10.244.0.6"],
                                     ports=[("http", 8080)], node_name=NODE))  # fmt: skip
    await checks.update(proxy.status())
    code, body = await get(port)
    assert code == 200 and body["localEndpoints"] == 2
    healthy["proxy"] = False
    code, body = await get(port)
    assert code == 503 and body["serviceProxyHealthy"] is False


async def test_ports_open_and_close_with_services_and_a_clash_hurts_only_its_service(
    rig: tuple[UserProxy, ServiceHealthServers, dict[str, bool]],
) -> None:
    proxy, checks, _ = rig
    port = free_port()
    await proxy.apply(lb(port))
    await checks.update(proxy.status())
    assert (await get(port))[0] == 503
    await proxy.delete("Service", "web")
    await checks.update(proxy.status())
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(port)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        clash = int(taken.getsockname()[1])
        other = free_port()
        await proxy.apply(lb(clash))
        second = lb(other)
        second["metadata"]["name"] = "api"  # type: ignore[index]
        await proxy.apply(second)
        await checks.update(proxy.status())
        assert clash in checks.errors()
        assert (await get(other))[0] == 503  # the other Service's check is served
    finally:
        taken.close()
