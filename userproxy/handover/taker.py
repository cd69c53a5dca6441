"""The new process's side: ask the running one for its sockets.

`take_over` returns what was inherited (`Inheritance`), `Refused` when the running process
speaks no common version (it then exits, leaving its rules), or None when nobody answers
(no process, or one too old to offer hand-over)."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from userproxy.handover.adoption import Adoption
from userproxy.handover.channel import Channel
from userproxy.handover.protocol import LOCK, VERSIONS, ProtocolError

log = structlog.get_logger("userproxy.handover")

#: Seconds the running process may take to answer after our `serving`.
RELEASE_TIMEOUT = 30.0


@dataclass(frozen=True)
class Refused:
    reason: str


@dataclass
class Inheritance:
    """Descriptors received, by key; the channel stays open until `confirm()`."""

    peer_pid: int
    fds: dict[str, int]
    channel: Channel | None = field(default=None, repr=False)

    def take_lock(self) -> int | None:
        return self.fds.pop(LOCK, None)

    def adoption(self, ports: dict[str, int] | None = None) -> Adoption:
        """The sockets, for the listeners to adopt (each key once)."""
        sockets: dict[str, socket.socket] = {}
        for key, fd in list(self.fds.items()):
            try:
                sockets[key] = socket.socket(fileno=fd)
            except OSError:  # not a socket after all
                os.close(fd)
            del self.fds[key]
        return Adoption(sockets, ports)

    async def confirm(self) -> None:
        """Tell the running process we serve; it stops accepting and drains."""
        channel, self.channel = self.channel, None
        if channel is None:
            return
        try:
            await channel.send("serving")
            reply, fds = await channel.receive(timeout=RELEASE_TIMEOUT)
            for fd in fds:
                os.close(fd)
            if reply.kind != "released":
                log.warning("The previous process answered oddly to serving.", reply=reply.kind)
        except (ConnectionError, ProtocolError, TimeoutError, OSError) as err:
            # We serve either way; the previous process may keep accepting until it exits.
            log.warning("The previous process did not confirm the hand-over.",
                        reason=str(err) or type(err).__name__)  # fmt: skip
        finally:
            channel.close()

    def abandon(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        if self.channel is not None:
            self.channel.close()
            self.channel = None


async def take_over(path: Path, *, mode: str) -> Inheritance | Refused | None:
    try:
        channel = await Channel.connect(str(path))
    except (OSError, TimeoutError):
        return None  # nobody offers hand-over there
    if not channel.trusted():
        channel.close()
        log.warning("The hand-over socket belongs to another user; starting cold.", path=str(path))
        return None
    fds: dict[str, int] = {}
    try:
        await channel.send("hello", versions=list(VERSIONS), pid=os.getpid(), mode=mode)
        answer, extra = await channel.receive()
        _close(extra)
        if answer.kind == "refuse":
            channel.close()
            return Refused(str(answer.fields.get("reason", "")))
        if answer.kind != "welcome":
            raise ProtocolError(f"expected welcome, got {answer.kind}")
        peer = answer.get_int("pid")
        while True:
            message, received = await channel.receive()
            if message.kind == "end":
                _close(received)
                break
            keys = message.get_strs("keys")
            if message.kind != "sockets" or len(keys) != len(received):
                _close(received)
                raise ProtocolError(f"{len(received)} descriptors for {len(keys)} keys")
            fds.update(zip(keys, received, strict=True))
    except (ConnectionError, ProtocolError, TimeoutError, OSError) as err:
        _close(list(fds.values()))
        channel.close()
        log.warning("The hand-over failed; starting cold.", reason=str(err) or type(err).__name__)
        return None
    return Inheritance(peer, fds, channel)


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
