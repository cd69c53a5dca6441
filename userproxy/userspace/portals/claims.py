"""NodePort claims: a real socket bound on every address (same protocol) for as long as the
service exists, so no other process can take the port and quietly receive traffic meant for
the service (kube-proxy's `claimNodePort`)."""

from __future__ import annotations

import socket
from typing import Protocol as TypingProtocol

from userproxy.model import Protocol


class NodePortClaimer(TypingProtocol):
    def claim(self, protocol: Protocol, port: int) -> object:
        """Hold the port; raises OSError (EADDRINUSE when someone else has it)."""
        ...

    def release(self, claim: object) -> None: ...


class SocketClaimer:
    def claim(self, protocol: Protocol, port: int) -> object:
        kind = socket.SOCK_STREAM if protocol is Protocol.TCP else socket.SOCK_DGRAM
        sock = socket.socket(socket.AF_INET, kind)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            sock.close()
            raise
        return sock

    def release(self, claim: object) -> None:
        assert isinstance(claim, socket.socket)
        claim.close()
