"""The UDP path: full-size datagrams, per-client flows, idle expiry, no endpoints."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from tests.conftest import loopback_settings
from tests.helpers import LOCAL, udp_ask, udp_echo, wait_for
from userproxy import ProxySettings, UserProxy
from userproxy.objects import endpoint_slice, service

NAME = "default/dns:dns"


async def serve(proxy: UserProxy, *ports: int) -> int:
    await proxy.apply(
        service("dns", cluster_ip="10.96.0.10", ports=[("dns", 53, "UDP")]),
        *(
            endpoint_slice("dns", name=f"dns-{p}", addresses=[LOCAL], ports=[("dns", p, "UDP")])
            for p in ports
        ),
    )
    return proxy.proxy_port(NAME)


async def test_largest_ipv4_datagram_passes_intact(proxy: UserProxy, udp_backend: int) -> None:
    port = await serve(proxy, udp_backend)
    payload = os.urandom(65507)
    assert await udp_ask(port, payload) == payload
    counters = proxy.counters(NAME)
    assert counters.bytes_from_clients == counters.bytes_to_clients == 65507


async def test_each_client_gets_its_own_flow_and_its_own_replies(proxy: UserProxy) -> None:
    echoes = [await udp_echo(prefix=f"b{i}:".encode()) for i in range(2)]
    port = await serve(proxy, *(p for _, p in echoes))
    replies = await asyncio.gather(*(udp_ask(port, f"client {i}".encode()) for i in range(50)))
    for i, reply in enumerate(replies):
        assert reply.split(b":", 1)[1] == f"client {i}".encode()
    assert {r.split(b":")[0] for r in replies} == {b"b0", b"b1"}
    assert proxy.counters(NAME).total == 50
    for transport, _ in echoes:
        transport.close()


async def test_flow_keeps_its_endpoint_while_active_then_idles_out(udp_backend: int) -> None:
    async with UserProxy(loopback_settings(udp_idle_timeout=0.2)) as proxy:
        port = await serve(proxy, udp_backend)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect((LOCAL, port))
        loop = asyncio.get_running_loop()
        for i in range(5):  # traffic every 0.1 s keeps the one flow alive past its timeout
            await loop.sock_sendall(sock, b"%d" % i)
            assert await asyncio.wait_for(loop.sock_recv(sock, 100), 1) == b"%d" % i
            await asyncio.sleep(0.1)
        assert proxy.counters(NAME).total == 1
        await wait_for(lambda: proxy.counters(NAME).active == 0, timeout=2, what="idle expiry")
        await loop.sock_sendall(sock, b"again")
        assert await asyncio.wait_for(loop.sock_recv(sock, 100), 1) == b"again"
        assert proxy.counters(NAME).total == 2
        sock.close()


async def test_no_endpoints_drops_and_counts(proxy: UserProxy) -> None:
    await proxy.apply(service("dns", cluster_ip="10.96.0.10", ports=[("dns", 53, "UDP")]))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.sendto(b"lost", (LOCAL, proxy.proxy_port(NAME)))
    sock.close()
    runtime = proxy.provider.runtimes[next(iter(proxy.provider.runtimes))]
    await wait_for(lambda: runtime.stats.rejected == 1, what="rejected datagram")


async def test_dead_endpoint_flow_is_dropped_and_next_datagram_goes_elsewhere(
    proxy: UserProxy, udp_backend: int
) -> None:
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind((LOCAL, 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens: the kernel answers ICMP port unreachable
    port = await serve(proxy, dead_port, udp_backend)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect((LOCAL, port))
    loop = asyncio.get_running_loop()
    answered = 0
    for i in range(6):
        await loop.sock_sendall(sock, b"q%d" % i)
        try:
            await asyncio.wait_for(loop.sock_recv(sock, 100), 0.3)
            answered += 1
        except TimeoutError:
            pass
    sock.close()
    # At most the first datagram sent to the dead endpoint is lost; the flow then moves.
    assert answered >= 5


def _wildcard_settings(**overrides: object) -> ProxySettings:
    # Bound to every address, as on a node; the tests still only send to loopback.
    return ProxySettings(bind_address="0.0.0.0", min_sync_period=0.0, **overrides)  # type: ignore[arg-type]


def _unconnected_client() -> socket.socket:
    """A blocking client socket that sees each reply's source address (recvfrom)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOCAL, 0))
    sock.settimeout(2)
    return sock


def _listener(proxy: UserProxy) -> Any:
    return proxy.provider.runtimes[next(iter(proxy.provider.runtimes))].listener  # type: ignore[union-attr]


def _flows(proxy: UserProxy) -> dict[tuple[str, int], Any]:
    return _listener(proxy).flows  # type: ignore[no-any-return]


async def test_wildcard_flow_continues_on_its_client_socket_with_the_right_source(
    udp_backend: int,
) -> None:
    """After the first datagram, a flow's traffic uses a socket connected to the client (the
    kernel prefers it); replies still come from the address the client sent to."""
    async with UserProxy(_wildcard_settings()) as proxy:
        port = await serve(proxy, udp_backend)
        with _unconnected_client() as sock:
            for i in range(20):
                payload = os.urandom(100 + i)
                await asyncio.to_thread(sock.sendto, payload, (LOCAL, port))
                reply, source = await asyncio.to_thread(sock.recvfrom, 70000)
                assert (reply, source) == (payload, (LOCAL, port))
                if i == 0:  # from now on the service socket is not read: the kernel must
                    # deliver the flow's datagrams to its client socket
                    listener = _listener(proxy)
                    listener.loop.remove_reader(listener.sock.fileno())
            flows = list(_flows(proxy).values())
            assert len(flows) == 1 and flows[0].client_sock is not None
            counters = proxy.counters(NAME)
            assert counters.total == 1
            assert (
                counters.bytes_from_clients
                == counters.bytes_to_clients
                == sum(100 + i for i in range(20))
            )


async def test_wildcard_flow_idles_out_and_the_same_client_starts_a_new_one(
    udp_backend: int,
) -> None:
    async with UserProxy(_wildcard_settings(udp_idle_timeout=0.2)) as proxy:
        port = await serve(proxy, udp_backend)
        with _unconnected_client() as sock:
            for _ in range(2):
                await asyncio.to_thread(sock.sendto, b"hello", (LOCAL, port))
                assert await asyncio.to_thread(sock.recvfrom, 100) == (b"hello", (LOCAL, port))
                await wait_for(lambda: proxy.counters(NAME).active == 0, timeout=2, what="expiry")
                assert _flows(proxy) == {}
            assert proxy.counters(NAME).total == 2
