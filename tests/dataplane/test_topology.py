"""Topology hints with real traffic: connections through the proxy go only to the endpoints
hinted for this node's zone, and to every endpoint once the hints are partial."""

from __future__ import annotations

import asyncio
import dataclasses

from tests.conftest import loopback_settings
from tests.helpers import TcpBackend, tcp_name
from userproxy import UserProxy
from userproxy.objects import endpoint_slice, service


def hinted(ports: dict[str, int], zones: dict[str, str | None]) -> list[dict[str, object]]:
    """One slice per backend (each on its own port), hinted for a zone or not at all."""
    slices = []
    for name, port in ports.items():
        obj = endpoint_slice("web", addresses=["127.0.0.1"], ports=[("http", port)],
                             name=f"web-{name}")  # fmt: skip
        if zones[name] is not None:
            obj["endpoints"][0]["hints"] = {"forZones": [{"name": zones[name]}]}  # type: ignore[index]
        slices.append(obj)
    return slices


async def test_connections_stay_in_the_zone_the_hints_name(backends: list[TcpBackend]) -> None:
    settings = dataclasses.replace(loopback_settings(), node_zone="zone-a")
    ports = {b.name: b.port for b in backends[:3]}
    names = list(ports)
    async with UserProxy(settings) as proxy:
        await proxy.apply(service("web", cluster_ip="10.96.0.10", ports=[("http", 80)]),
                          *hinted(ports, {names[0]: "zone-a", names[1]: "zone-b",
                                          names[2]: "zone-a"}))  # fmt: skip
        port = proxy.proxy_port("default/web:http")
        seen = {await tcp_name(port) for _ in range(12)}
        assert seen == {names[0], names[2]}
        await proxy.apply(*hinted(ports, {names[0]: "zone-a", names[1]: None, names[2]: "zone-a"}))
        await asyncio.sleep(0)
        seen = {await tcp_name(port) for _ in range(12)}
        assert seen == set(names)  # partial hints: every endpoint
