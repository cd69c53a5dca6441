"""One hand-over connection: a SOCK_SEQPACKET UNIX socket carrying one JSON message per
packet, with descriptors as SCM_RIGHTS. Sequenced packets keep each message and its
descriptors together, which a byte stream would not."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable, Sequence

from userproxy.handover.protocol import (
    FDS_PER_MESSAGE,
    MAX_MESSAGE,
    Message,
    ProtocolError,
    decode,
    encode,
)

#: struct ucred: pid, uid, gid.
_UCRED = struct.Struct("3i")
#: Seconds either side waits for the other's next message before giving up.
STEP_TIMEOUT = 10.0


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def connect(cls, path: str) -> Channel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, path), STEP_TIMEOUT
            )
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, kind: str, fds: Sequence[int] = (), **fields: object) -> None:
        data = encode(kind, **fields)
        await self._writable()
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.send(data)

    async def receive(self, timeout: float = STEP_TIMEOUT) -> tuple[Message, list[int]]:
        """The next message and the descriptors that came with it (the caller owns them).
        Raises ConnectionError when the peer has gone, ProtocolError on garbage."""
        await asyncio.wait_for(self._readable(), timeout)
        data, fds, flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE, FDS_PER_MESSAGE)
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            _close(fds)
            raise ProtocolError("a message or its descriptors were truncated")
        if not data:
            _close(fds)
            raise ConnectionError("the peer closed the hand-over connection")
        try:
            return decode(data), fds
        except ProtocolError:
            _close(fds)
            raise

    def peer_uid(self) -> int:
        """The user id of the process at the other end (SO_PEERCRED: the kernel's word)."""
        creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        return int(_UCRED.unpack(creds)[1])

    def trusted(self) -> bool:
        """Only a process of our own user may take or give listening sockets."""
        try:
            return self.peer_uid() == os.geteuid()
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()

    async def _readable(self) -> None:
        await self._ready(self.loop.add_reader, self.loop.remove_reader)

    async def _writable(self) -> None:
        await self._ready(self.loop.add_writer, self.loop.remove_writer)

    async def _ready(self, watch: Callable[..., object], unwatch: Callable[[int], object]) -> None:
        ready: asyncio.Future[None] = self.loop.create_future()
        fd = self.sock.fileno()
        watch(fd, _settle, ready)
        try:
            await ready
        finally:
            unwatch(fd)


def _settle(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)
