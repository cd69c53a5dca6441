"""NodePort claims: a real socket bound on every address (same protocol) for as long as the
service exists, so no other process can take the port and quietly receive traffic meant for
the service (kube-proxy's `claimNodePort`)."""

from __future__ import annotations

import socket
from typing import Protocol as TypingProtocol

from userproxy.handover.adoption import Adoption
from userproxy.handover.protocol import claim_key
from userproxy.model import Protocol


class NodePortClaimer(TypingProtocol):
    def claim(self, protocol: Protocol, port: int) -> object:
        """Hold the port; raises OSError (EADDRINUSE when someone else has it)."""
        ...

    def release(self, claim: object) -> None: ...

    def fileno(self, claim: object) -> int:
        """The claim's descriptor, to hand over to a successor."""
        ...


class SocketClaimer:
    def __init__(self, adoption: Adoption | None = None) -> None:
        #: Claims a predecessor handed over (consulted until its first sync is over).
        self.adoption = adoption

    def claim(self, protocol: Protocol, port: int) -> object:
        inherited = self.adoption.take(claim_key(protocol, port)) if self.adoption else None
        if inherited is not None:
            return inherited
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

    def fileno(self, claim: object) -> int:
        assert isinstance(claim, socket.socket)
        return claim.fileno()
