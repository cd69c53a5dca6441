"""Many connections, and backends that die mid-stream: every byte arrives intact, and the
descriptor count and memory come back to where they were."""

from __future__ import annotations

import asyncio
import random
import resource

from tests.conftest import loopback_settings
from tests.helpers import LOCAL, TcpBackend, open_fds, wait_for
from userproxy import UserProxy
from userproxy.objects import endpoint_slice, service

SEED = 1201
CONNECTIONS = 10_000
AT_ONCE = 100
NAME = "default/echo:tcp"


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def exchange(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(LOCAL, port)
    try:
        writer.write(payload)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A backend that keeps nothing once a connection is over (the shared test backend
    remembers every connection, which would hide the proxy's own memory use)."""
    try:
        writer.write(b"pod1\n")
        while data := await reader.read(65536):
            writer.write(data)
        writer.write_eof()
        await writer.drain()
    finally:
        writer.close()


async def test_ten_thousand_connections_arrive_intact_and_leave_nothing() -> None:
    rng = random.Random(SEED)
    server = await asyncio.start_server(echo, LOCAL, 0)
    backend_port = server.sockets[0].getsockname()[1]
    async with server, UserProxy(loopback_settings()) as proxy:
        await proxy.apply(
            service("echo", cluster_ip="10.96.0.30", ports=[("tcp", 80)]),
            endpoint_slice("echo", addresses=[LOCAL], ports=[("tcp", backend_port)]),
        )
        port = proxy.proxy_port(NAME)
        await exchange(port, b"warm-up")
        fds = open_fds()
        # Twice: the first round sets the allocator's high-water mark, the second must not
        # need more (a leak would grow with every connection).
        after_first = await rounds(port, rng)
        await rounds(port, rng)
        assert rss_kib() - after_first < 8 * 1024, "memory grew by more than 8 MiB"
        await wait_for(lambda: proxy.counters(NAME).active == 0, 5, "every relay closed")
        assert proxy.counters(NAME).total == 2 * CONNECTIONS + 1
        await wait_for(lambda: open_fds() <= fds, 5, "the descriptors to come back")


async def rounds(port: int, rng: random.Random) -> int:
    """CONNECTIONS byte-checked exchanges, AT_ONCE at a time; the RSS after them."""
    wrong = 0
    for _ in range(CONNECTIONS // AT_ONCE):
        batch = [rng.randbytes(rng.randint(1, 4096)) for _ in range(AT_ONCE)]
        replies = await asyncio.gather(*(exchange(port, p) for p in batch))
        wrong += sum(reply != b"pod1\n" + p for reply, p in zip(replies, batch, strict=True))
    assert wrong == 0, f"{wrong} connections did not get their own bytes back"
    return rss_kib()


async def test_a_backend_killed_mid_stream_ends_the_relay(backends: list[TcpBackend]) -> None:
    async def half_then_die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"x" * 100_000)
        await writer.drain()
        writer.transport.abort()  # the process dies: its kernel resets the connection

    dying = TcpBackend("dying")
    await dying.start(half_then_die)
    try:
        async with UserProxy(loopback_settings()) as proxy:
            await proxy.apply(
                service("echo", cluster_ip="10.96.0.30", ports=[("tcp", 80)]),
                endpoint_slice("echo", addresses=[LOCAL], ports=[("tcp", dying.port)]),
            )
            fds = open_fds()
            for _ in range(20):
                reader, writer = await asyncio.open_connection(LOCAL, proxy.proxy_port(NAME))
                got = b""
                try:
                    while chunk := await asyncio.wait_for(reader.read(65536), 5):
                        got += chunk
                except ConnectionResetError:
                    pass  # the reset passed on: what a direct client of the backend sees
                finally:
                    writer.close()
                assert len(got) <= 100_000
            await wait_for(lambda: proxy.counters(NAME).active == 0, 5, "every relay closed")
            await wait_for(lambda: open_fds() <= fds, 5, "the descriptors to come back")
    finally:
        await dying.stop()
