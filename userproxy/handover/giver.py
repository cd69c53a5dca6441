"""The running process's side: offer the listening sockets to a successor.

`HandoverServer` listens on the hand-over socket. On a successor's hello it pauses the rule
writes, sends every socket the proxy holds, and waits for the successor to say it serves;
then it lets the proxy stop accepting and reports `handed_over`. A successor that vanishes
or misbehaves before that leaves the proxy as it was (the rule writes resume). A successor
that speaks no common version is refused and `stepped_aside` is set: the caller then exits
leaving the rules, so the successor can cold-start on the same ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import structlog

from userproxy import tasks
from userproxy.handover.channel import Channel
from userproxy.handover.protocol import VERSIONS, ProtocolError, choose_version, chunks

log = structlog.get_logger("userproxy.handover")

#: Seconds the successor may take from the sockets to serving: its first sync (10,000 ports
#: take a few seconds).
SERVING_TIMEOUT = 120.0


class Giver(Protocol):
    """What the running proxy does during a hand-over."""

    mode: str

    def handover_fds(self) -> Sequence[tuple[str, int]]:
        """Every descriptor a successor takes over, by key."""
        ...

    async def pause(self) -> None:
        """Stop writing rules (the successor writes them from now on)."""
        ...

    def resume(self) -> None:
        """The hand-over failed: carry on as before."""
        ...

    async def release(self) -> None:
        """The successor serves: stop accepting and close the servers; relays go on."""
        ...


class HandoverServer:
    def __init__(self, path: Path, giver: Giver) -> None:
        self.path = path
        self.giver = giver
        self.handed_over = asyncio.Event()
        self.stepped_aside = asyncio.Event()
        self.successor_pid: int | None = None
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen (replacing a socket file a dead process left). Failing to is logged: the
        proxy works, only without hand-over."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            self._inode = self.path.stat().st_ino
            sock.listen(4)
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            log.warning("Cannot offer hand-over to a successor; a restart will cold-start.",
                        path=str(self.path), reason=str(err))  # fmt: skip
            return
        self._listener = sock
        self._task = tasks.background(self._accept_until_done(), name="handover")

    async def close(self) -> None:
        if self._task is not None:
            await tasks.stop_all([self._task])
            self._task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            # After a hand-over the path is the successor's socket: leave that one alone.
            with contextlib.suppress(OSError):
                if self.path.stat().st_ino == self._inode:
                    self.path.unlink()

    async def _accept_until_done(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while not (self.handed_over.is_set() or self.stepped_aside.is_set()):
            conn, _ = await loop.sock_accept(self._listener)
            channel = Channel(conn)
            try:
                await self._serve(channel)
            finally:
                channel.close()

    async def _serve(self, channel: Channel) -> None:
        if not channel.trusted():
            log.warning("Ignored a hand-over request from another user.")
            return
        try:
            hello, fds = await channel.receive()
        except (ConnectionError, ProtocolError, TimeoutError, OSError) as err:
            log.warning(
                "Ignored a broken hand-over request.", reason=str(err) or type(err).__name__
            )
            return
        for fd in fds:
            os.close(fd)
        if hello.kind != "hello":
            log.warning("Ignored a hand-over request that does not start with hello.")
            return
        pid = hello.fields.get("pid")
        version = choose_version(_list(hello.fields.get("versions")))
        if version is None or hello.fields.get("mode") != self.giver.mode:
            await self._refuse(channel, hello.fields, pid)
            return
        log.info("A successor asks for the listening sockets; handing over.", successor=pid,
                 version=version)  # fmt: skip
        await self.giver.pause()
        try:
            await self._give(channel, version)
        except (ConnectionError, ProtocolError, TimeoutError, OSError) as err:
            log.warning("The successor went away before it served; carrying on as before.",
                        successor=pid, reason=str(err) or type(err).__name__)  # fmt: skip
            self.giver.resume()
            return
        self.successor_pid = pid if isinstance(pid, int) else None
        self.handed_over.set()

    async def _give(self, channel: Channel, version: int) -> None:
        await channel.send("welcome", version=version, pid=os.getpid())
        items = list(self.giver.handover_fds())
        keys = [key for key, _ in items]
        fds = dict(items)
        for group in chunks(keys):
            await channel.send("sockets", fds=[fds[k] for k in group], keys=list(group))
        await channel.send("end", count=len(keys))
        reply, extra = await channel.receive(timeout=SERVING_TIMEOUT)
        for fd in extra:
            os.close(fd)
        if reply.kind != "serving":
            raise ProtocolError(f"expected serving, got {reply.kind}")
        await self.giver.release()
        await channel.send("released")

    async def _refuse(self, channel: Channel, hello: dict[str, object], pid: object) -> None:
        reason = (
            f"this process speaks hand-over versions {list(VERSIONS)} in mode "
            f"{self.giver.mode}; the successor offered {hello.get('versions')} in mode "
            f"{hello.get('mode')}"
        )
        log.warning("Refused a successor's hand-over; stepping aside so it can cold-start "
                    "(the rules stay).", successor=pid, reason=reason)  # fmt: skip
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            await channel.send("refuse", reason=reason)
        self.stepped_aside.set()


def _list(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []
