"""Real loopback backends and small waiting helpers shared by the socket tests."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

LOCAL = "127.0.0.1"


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Poll `condition` every 10 ms until true; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.01)


@dataclass
class TcpBackend:
    """A TCP server; by default it answers each connection with its name and echoes the rest."""

    name: str
    server: asyncio.Server | None = None
    connections: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self, handler: Callable[..., Any] | None = None) -> TcpBackend:
        serve = handler or self._name_then_echo

        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.handlers.add(task)
            self.writers.append(writer)
            try:
                await serve(reader, writer)
            except (OSError, RuntimeError, asyncio.IncompleteReadError):
                pass  # the peer went away mid-test; the test asserts what it needs
            finally:
                writer.close()
                self.handlers.discard(task)

        self.server = await asyncio.start_server(tracked, LOCAL, 0)
        return self

    async def _name_then_echo(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        writer.write(self.name.encode() + b"\n")
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in self.writers:
                w.close()
            for task in list(self.handlers):
                task.cancel()
            await asyncio.gather(*self.handlers, return_exceptions=True)
            await self.server.wait_closed()


class UdpEcho(asyncio.DatagramProtocol):
    """Replies to every datagram with `name:` + the datagram (or the bare datagram)."""

    def __init__(self, prefix: bytes = b"") -> None:
        self.prefix = prefix
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(self.prefix + data, addr)


async def udp_echo(prefix: bytes = b"") -> tuple[asyncio.DatagramTransport, int]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: UdpEcho(prefix), local_addr=(LOCAL, 0)
    )
    return transport, int(transport.get_extra_info("sockname")[1])


async def udp_ask(port: int, payload: bytes, *, timeout: float = 2.0, host: str = LOCAL) -> bytes:
    """Send one datagram from a fresh connected socket and return the reply."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.connect((host, port))
        await loop.sock_sendall(sock, payload)
        return await asyncio.wait_for(loop.sock_recv(sock, 70000), timeout)
    finally:
        sock.close()


async def tcp_name(port: int, host: str = LOCAL) -> str:
    """Connect, read the backend's name line, close."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3)
    try:
        return (await asyncio.wait_for(reader.readline(), 3)).decode().strip()
    finally:
        writer.close()


def send_reset(writer: asyncio.StreamWriter) -> None:
    """Close the client's connection with an RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
