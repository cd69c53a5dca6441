"""What a new process inherits: listening sockets from a hand-over, proxy ports from the
journal of a process that died. Listeners, NodePort claims and servers take theirs by key
(`protocol.*_key`) as they open; whatever nobody took is closed after the first sync."""

from __future__ import annotations

import contextlib
import socket

import structlog

from userproxy.handover.protocol import family_of_key
from userproxy.model import Family

log = structlog.get_logger("userproxy.handover")


class Adoption:
    def __init__(
        self, sockets: dict[str, socket.socket] | None = None, ports: dict[str, int] | None = None
    ) -> None:
        self._sockets = dict(sockets or {})
        self._ports = dict(ports or {})
        self.adopted = 0

    def take(self, key: str) -> socket.socket | None:
        """The inherited socket of `key`, now the caller's."""
        sock = self._sockets.pop(key, None)
        if sock is not None:
            self.adopted += 1
        return sock

    def port(self, key: str) -> int | None:
        """The proxy port `key` had in the previous process (to bind again after a crash)."""
        return self._ports.get(key)

    def part(self, family: Family) -> Adoption:
        """Move this family's listeners and claims (and their journal ports) into an adoption
        of their own: each family's provider settles its own after its first sync."""
        mine = Adoption()
        for key in [k for k in self._sockets if family_of_key(k) is family]:
            mine._sockets[key] = self._sockets.pop(key)
        for key in [k for k in self._ports if family_of_key(k) is family]:
            mine._ports[key] = self._ports.pop(key)
        return mine

    def close_rest(self) -> int:
        """Close the sockets nobody adopted (their services are gone). Returns how many."""
        rest, self._sockets = self._sockets, {}
        for sock in rest.values():
            with contextlib.suppress(OSError):
                sock.close()
        self._ports.clear()
        return len(rest)
