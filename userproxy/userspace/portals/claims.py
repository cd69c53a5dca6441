"""NodePort claims: a real socket bound on every address (same protocol) for as long as the
service exists, so no other process can take the port and quietly receive traffic meant for
the service (kube-proxy's `claimNodePort`)."""

from __future__ import annotations

import socket
from typing import Protocol as TypingProtocol

from userproxy.handover.adoption import Adoption
from userproxy.handover.protocol import claim_key
from userproxy.model import Family, Protocol


class NodePortClaimer(TypingProtocol):
    def claim(self, protocol: Protocol, port: int) -> object:
        """Hold the port; raises OSError (EADDRINUSE when someone else has it)."""
        ...

    def release(self, claim: object) -> None: ...

    def fileno(self, claim: object) -> int:
        """The claim's descriptor, to hand over to a successor."""
        ...


class SocketClaimer:
    def __init__(self, adoption: Adoption | None = None, family: Family = Family.IPv4) -> None:
        #: Claims a predecessor handed over (consulted until its first sync is over).
        self.adoption = adoption
        self.family = family

    def claim(self, protocol: Protocol, port: int) -> object:
        key = claim_key(protocol, port, self.family)
        inherited = self.adoption.take(key) if self.adoption else None
        if inherited is not None:
            return inherited
        kind = socket.SOCK_STREAM if protocol is Protocol.TCP else socket.SOCK_DGRAM
        sock = socket.socket(self.family.socket_family, kind)
        try:
            if self.family is Family.IPv6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(("::" if self.family is Family.IPv6 else "0.0.0.0", port))
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
