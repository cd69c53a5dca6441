"""Dual-stack Services on loopback: a proxy port per family, each family's endpoints only,
UDP replies from the right source, and both families in the status."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from tests.conftest import loopback_settings
from userproxy import UserProxy
from userproxy.model import Family
from userproxy.objects import endpoint_slice, service

pytestmark = pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this host")


async def named_server(host: str, name: bytes) -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(name + b"\n")
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, host, 0)


class UdpName(asyncio.DatagramProtocol):
    def __init__(self, name: bytes) -> None:
        self.name = name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(self.name, addr)  # type: ignore[attr-defined]


@pytest.fixture
async def dual() -> AsyncIterator[tuple[UserProxy, dict[Family, int]]]:
    v4, v6 = await named_server("127.0.0.1", b"v4"), await named_server("::1", b"v6")
    ports = {
        Family.IPv4: v4.sockets[0].getsockname()[1],
        Family.IPv6: v6.sockets[0].getsockname()[1],
    }
    loop = asyncio.get_running_loop()
    udp = [
        await loop.create_datagram_endpoint(lambda n=n: UdpName(n), local_addr=(host, ports[f]))  # type: ignore[misc]
        for f, host, n in ((Family.IPv4, "127.0.0.1", b"v4"), (Family.IPv6, "::1", b"v6"))
    ]
    proxy = UserProxy(loopback_settings())
    await proxy.start()
    await proxy.apply(
        service(
            "web",
            cluster_ip="10.96.0.10",
            cluster_ips=["10.96.0.10", "fd00:96::10"],
            ports=[("http", 80), ("dns", 53, "UDP")],
        ),
        endpoint_slice(
            "web",
            addresses=["127.0.0.1"],
            name="web-v4",
            ports=[("http", ports[Family.IPv4]), ("dns", ports[Family.IPv4], "UDP")],
        ),
        endpoint_slice(
            "web",
            addresses=["::1"],
            name="web-v6",
            ports=[("http", ports[Family.IPv6]), ("dns", ports[Family.IPv6], "UDP")],
        ),
    )
    yield proxy, ports
    await proxy.stop()
    for server in (v4, v6):
        server.close()
    for transport, _ in udp:
        transport.close()


def served(proxy: UserProxy, name: str) -> dict[Family, int]:
    return {
        sp.port.family: sp.proxy_port
        for sp in proxy.status().service_ports
        if str(sp.name) == name and sp.proxy_port is not None
    }


async def test_each_family_has_its_proxy_port_and_only_its_endpoints(
    dual: tuple[UserProxy, dict[Family, int]],
) -> None:
    proxy, _ = dual
    tcp = served(proxy, "default/web:http")
    assert set(tcp) == {Family.IPv4, Family.IPv6}
    for family, host, want in ((Family.IPv4, "127.0.0.1", b"v4\n"), (Family.IPv6, "::1", b"v6\n")):
        reader, writer = await asyncio.open_connection(host, tcp[family])
        assert await asyncio.wait_for(reader.readline(), 3) == want
        writer.close()


async def test_udp_replies_come_from_the_address_the_client_sent_to(
    dual: tuple[UserProxy, dict[Family, int]],
) -> None:
    proxy, _ = dual
    udp = served(proxy, "default/web:dns")
    loop = asyncio.get_running_loop()
    for family, host, want in ((Family.IPv4, "127.0.0.1", b"v4"), (Family.IPv6, "::1", b"v6")):
        sock = socket.socket(family.socket_family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect((host, udp[family]))  # only replies from there are accepted
            await loop.sock_sendall(sock, b"hi")
            assert await asyncio.wait_for(loop.sock_recv(sock, 100), 3) == want
        finally:
            sock.close()


async def test_removing_one_family_leaves_the_other_served(
    dual: tuple[UserProxy, dict[Family, int]],
) -> None:
    proxy, _ = dual
    await proxy.apply(service("web", cluster_ip="10.96.0.10", ports=[("http", 80)]))
    assert set(served(proxy, "default/web:http")) == {Family.IPv4}
