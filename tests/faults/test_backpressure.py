"""Back-pressured relays still see resets: when one side stops reading, the relay stops
reading the other, and a reset from that other side must still tear the relay down (on
transports and on splice), with the descriptor count back to its baseline."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.conftest import loopback_settings
from tests.helpers import LOCAL, open_fds, wait_for
from userproxy import UserProxy
from userproxy.objects import endpoint_slice, service
from userproxy.userspace.splice import SPLICE_AFTER, SpliceRelay

NAME = "default/sink:data"
CHUNK = b"x" * 65536
#: Enough to fill every buffer on the way when nobody reads (bounded, in case one grows).
FILL_LIMIT = 64 << 20


class Backend:
    """Reads `read_first` bytes, then stops reading; optionally writes without end."""

    def __init__(self, *, read_first: int = 0, write: bool = False) -> None:
        self.read_first = read_first
        self.write = write
        self.writers: list[asyncio.StreamWriter] = []
        self.handlers: list[asyncio.Task[Any]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.handlers.append(task)
        got = 0
        while got < self.read_first and (data := await reader.read(65536)):
            got += len(data)
        if self.write:
            while True:
                writer.write(CHUNK)
                await writer.drain()  # blocks for good once the client stops reading
        await asyncio.Event().wait()  # hold the connection, reading nothing

    async def close(self) -> None:
        """Let go of the backend's own connections (it reads nothing, so it notices nothing)."""
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        for writer in self.writers:
            writer.transport.abort()
        await asyncio.sleep(0)

    def reset_all(self) -> None:
        for writer in self.writers:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


@pytest.fixture
async def rig() -> AsyncIterator[Callable[..., Any]]:
    started: list[tuple[UserProxy, Backend, asyncio.Server]] = []

    async def start(backend: Backend, *, splice: bool) -> UserProxy:
        server = await asyncio.start_server(backend.handle, LOCAL, 0)
        port = server.sockets[0].getsockname()[1]
        proxy = UserProxy(loopback_settings())
        await proxy.start()
        await proxy.apply(
            service("sink", cluster_ip="10.96.0.20", ports=[("data", 80)]),
            endpoint_slice("sink", addresses=[LOCAL], ports=[("data", port)]),
        )
        if not splice:
            listener = next(iter(proxy.provider.runtimes.values())).listener  # type: ignore[attr-defined]
            listener.splice_budget = 0
        started.append((proxy, backend, server))
        return proxy

    yield start
    for proxy, backend, server in started:
        await proxy.stop()
        await backend.close()
        server.close()
        await server.wait_closed()


async def fill(sock: socket.socket) -> int:
    """Send until nothing more is taken (every buffer on the way is full)."""
    sent, stalled = 0, 0
    while sent < FILL_LIMIT and stalled < 20:
        try:
            sent += sock.send(CHUNK)
            stalled = 0
        except BlockingIOError:
            stalled += 1
            await asyncio.sleep(0.02)
    return sent


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def client_to(proxy: UserProxy) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (LOCAL, proxy.proxy_port(NAME)))
    return sock


@pytest.mark.parametrize("splice", [False, True], ids=["transports", "splice"])
async def test_a_client_reset_while_its_reading_is_paused_ends_the_relay(
    rig: Callable[..., Any], splice: bool
) -> None:
    backend = Backend(read_first=2 * SPLICE_AFTER if splice else 0)
    proxy = await rig(backend, splice=splice)
    baseline = open_fds()
    client = await client_to(proxy)
    await wait_for(lambda: proxy.counters(NAME).active == 1, what="the relay")
    assert await fill(client) > 0
    assert (SpliceRelay.active == 1) is splice
    reset(client)
    await wait_for(lambda: proxy.counters(NAME).active == 0, 3, "the relay to see the reset")
    await backend.close()
    await wait_for(lambda: open_fds() == baseline, 3, "the descriptors to be released")


async def test_a_backend_reset_while_its_reading_is_paused_ends_the_relay(
    rig: Callable[..., Any],
) -> None:
    backend = Backend(write=True)
    proxy = await rig(backend, splice=False)
    baseline = open_fds()
    client = await client_to(proxy)  # reads nothing: the proxy stops reading the backend
    try:
        await wait_for(lambda: proxy.counters(NAME).bytes_to_clients > 0, what="data flowing")
        await asyncio.sleep(0.5)  # until every buffer on the way is full
        backend.reset_all()
        await wait_for(lambda: proxy.counters(NAME).active == 0, 3, "the relay to see it")
    finally:
        client.close()
    await backend.close()
    await wait_for(lambda: open_fds() == baseline, 3, "the descriptors to be released")
