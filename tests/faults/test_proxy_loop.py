"""Proxy loops are refused: an EndpointSlice that names the proxy's own proxy port (or, with
portals, a service address it serves) is not used; the proxy stays up, the service refuses
connections instead of dialling itself until descriptors run out."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import structlog

from tests.conftest import loopback_settings
from tests.helpers import LOCAL, TcpBackend, open_fds, tcp_name, wait_for
from userproxy import UserProxy
from userproxy.model import Endpoint
from userproxy.objects import endpoint_slice, service
from userproxy.userspace.loops import OwnAddresses
from userproxy.userspace.proxier import Proxier
from userproxy.userspace.tcp import RelayBudget

NAME = "default/loop:http"


async def test_an_endpoint_on_the_proxys_own_port_is_refused() -> None:
    async with UserProxy(loopback_settings()) as proxy:
        await proxy.apply(service("loop", cluster_ip="10.96.0.77", ports=[("http", 80)]))
        port = proxy.proxy_port(NAME)
        baseline = open_fds()
        with structlog.testing.capture_logs() as logs:
            await proxy.apply(endpoint_slice("loop", addresses=[LOCAL], ports=[("http", port)]))
        assert any("leads back into this proxy" in e["event"] for e in logs)
        [status] = proxy.service_ports()
        assert not status.has_endpoints
        for _ in range(20):  # each is refused at once (a reset); none dials the proxy again
            reader, writer = await asyncio.open_connection(LOCAL, port)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 2)
            writer.close()
        await asyncio.sleep(0.1)
        assert open_fds() <= baseline + 2


@pytest.mark.parametrize(
    ("endpoint", "looped"),
    [
        (Endpoint("192.0.2.2", 40001), True),  # a node address, a proxy port (wildcard bind)
        (Endpoint("127.0.0.1", 40001), True),
        (Endpoint("10.244.0.5", 40001), False),  # a pod that happens to use that port
        (Endpoint("10.96.0.10", 80), True),  # a ClusterIP the portals send here
        (Endpoint("10.96.0.10", 81), False),
        (Endpoint("192.0.2.2", 30080), True),  # a NodePort on this node
    ],
)
def test_what_counts_as_a_loop(endpoint: Endpoint, looped: bool) -> None:
    own = OwnAddresses(
        local=frozenset({"127.0.0.1", "192.0.2.2"}),
        proxy_ports=frozenset({40001}),
        service_addresses=frozenset({("10.96.0.10", 80)}),
        node_ports=frozenset({30080}),
    )
    assert (own.loop(endpoint) is not None) is looped


async def test_a_loop_that_slips_through_is_bounded_and_unwinds(
    monkeypatch: pytest.MonkeyPatch, backends: list[TcpBackend]
) -> None:
    # As if the endpoint checks could not see the loop (another address of this node, say).
    monkeypatch.setattr(OwnAddresses, "loop", lambda self, endpoint: None)
    budget = RelayBudget(descriptors=600)
    settings = loopback_settings()
    proxy = UserProxy(settings, provider=Proxier(settings=settings, relay_budget=budget))
    async with proxy:
        await proxy.apply(
            service("loop", cluster_ip="10.96.0.77", ports=[("http", 80)]),
            service("web", cluster_ip="10.96.0.78", ports=[("http", 80)]),
            endpoint_slice("web", addresses=[LOCAL], ports=[("http", backends[0].port)]),
        )
        port = proxy.proxy_port(NAME)
        await proxy.apply(endpoint_slice("loop", addresses=[LOCAL], ports=[("http", port)]))
        baseline = open_fds()
        reader, writer = await asyncio.open_connection(LOCAL, port)
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(reader.read(), 10)  # the loop runs, hits the budget, unwinds
        writer.close()
        assert budget.shed >= 1
        assert open_fds() < baseline + budget.descriptors
        await wait_for(lambda: budget.in_use == 0, 5, "the loop to unwind")
        assert await tcp_name(proxy.proxy_port("default/web:http")) == "pod1"
