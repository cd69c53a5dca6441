"""The portal manager: keeps the kernel's rules and the NodePort claims in line with the
served service ports. It is the userspace proxier's `Portals`.

Side effects go through small interfaces (`PortalRules`: iptables chains or an nftables
table; `NodePortClaimer`, `Conntrack`), each with a fake in `userproxy.testing`. A NodePort
already taken, or wanted by two services, is an error for that service only: its NodePort
rules are left out, everything else is served.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from userproxy import tasks
from userproxy.handover.protocol import claim_key
from userproxy.iptables.interface import RulesError
from userproxy.iptables.writer import RuleWriter
from userproxy.model import Family, Protocol, ServicePort, ServicePortName
from userproxy.nftables.interface import NftError
from userproxy.userspace.portals.claims import NodePortClaimer, SocketClaimer
from userproxy.userspace.portals.conntrack import Conntrack, ExecConntrack
from userproxy.userspace.portals.interface import ActivePort, PortalRules
from userproxy.userspace.portals.rules import PortalConfig, PortalPort

log = structlog.get_logger("userproxy.userspace.portals")

ClaimKey = tuple[Protocol, int]
#: Descriptors kept for the exit cleanup (a few pipes and a child process's).
CLEANUP_DESCRIPTORS = 16


def _reserve_descriptors(count: int) -> list[int]:
    reserve = []
    for _ in range(count):
        try:
            reserve.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            break
    return reserve


def detect_host_ip(family: Family = Family.IPv4) -> str:
    """The address of the default-route interface (what the old proxier DNATed host traffic to).

    A UDP `connect` only looks up the route; nothing is sent.
    """
    probe = socket.socket(family.socket_family, socket.SOCK_DGRAM)
    # Documentation prefixes (TEST-NET-1, 2001:db8::/32): any routable address does.
    target = ("2001:db8::1", 9) if family is Family.IPv6 else ("192.0.2.1", 9)
    try:
        probe.connect(target)
        return str(probe.getsockname()[0])
    except OSError:
        return "::1" if family is Family.IPv6 else "127.0.0.1"
    finally:
        probe.close()


@dataclass
class _Claim:
    owner: ServicePortName
    handle: object


class PortalManager:
    def __init__(
        self,
        *,
        rules: PortalRules,
        config: PortalConfig,
        full_sync_period: float = 30.0,
        claimer: NodePortClaimer | None = None,
        conntrack: Conntrack | None = None,
    ) -> None:
        self.rules = rules
        self.config = config
        #: `--iptables-sync-period`: how often the chains are rewritten whole.
        self.writer = RuleWriter(full_sync_period=full_sync_period)
        self.claimer = claimer or SocketClaimer()
        self.conntrack = conntrack or ExecConntrack()
        self.claims: dict[ClaimKey, _Claim] = {}
        self._node_port_errors: dict[ServicePortName, str] = {}
        #: UDP ports removed since the last rule write, and the flush in flight.
        self._stale_udp: list[ServicePort] = []
        self._flushing: asyncio.Task[None] | None = None
        #: Service ports whose un-redirected entries are to go (after a gap in the rules), and
        #: how many gaps the chain writer has healed so far (the first write is one).
        self._unredirected: list[ServicePort] = []
        self._gaps_healed = -1
        #: Descriptors held back for the cleanup on exit: removing the rules runs
        #: iptables-save and iptables-restore (pipes, a process), which must not fail when
        #: the proxy has run out of descriptors, or rules would point at closed ports.
        self._reserve = _reserve_descriptors(CLEANUP_DESCRIPTORS)

    # ------------------------------------------------------------------ Portals protocol
    async def sync(self, active: Sequence[ActivePort]) -> None:
        claimed = self._update_claims(active)
        desired = self.rules.build(
            PortalPort(
                a.port,
                a.proxy_port,
                a.has_endpoints,
                node_port_claimed=a.port.name in claimed,
                external_proxy_port=a.external_proxy_port,
                has_local_endpoints=a.has_local_endpoints,
            )
            for a in active
        )
        await self.writer.write(lambda full: self.rules.apply(desired, full=full))
        if self._gaps_healed != self.rules.gaps_healed:
            # The rules were absent until this write (first start, or a flush was healed):
            # connection attempts in between left entries that bypass them.
            self._gaps_healed = self.rules.gaps_healed
            self._unredirected = [a.port for a in active]
        self._flush_stale()

    async def port_removed(self, port: ServicePort) -> None:
        """A UDP port's conntrack entries are flushed once the next rule write has landed
        (so no new packet can recreate them through the old rule), in the background."""
        if port.protocol is Protocol.UDP:
            self._stale_udp.append(port)

    def _flush_stale(self) -> None:
        pending = self._stale_udp or self._unredirected
        if pending and (self._flushing is None or self._flushing.done()):
            self._flushing = tasks.background(self._flush(), name="conntrack-flush")

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._stale_udp or self._unredirected:
            if self._unredirected:
                ports, self._unredirected = self._unredirected, []
                await loop.run_in_executor(None, self.conntrack.flush_unredirected, ports)
            if self._stale_udp:
                ports, self._stale_udp = self._stale_udp, []
                await loop.run_in_executor(None, self.conntrack.flush_udp, ports)

    def node_port_errors(self) -> dict[ServicePortName, str]:
        return dict(self._node_port_errors)

    # ------------------------------------------------------------------ NodePort claims
    def _update_claims(self, active: Sequence[ActivePort]) -> set[ServicePortName]:
        wanted: dict[ClaimKey, ServicePortName] = {}
        self._node_port_errors.clear()
        for a in active:
            if not a.port.node_port:
                continue
            key = (a.port.protocol, a.port.node_port)
            if key in wanted:
                self._refuse(
                    a.port.name,
                    f"NodePort {key[1]}/{key[0].value} is already used by {wanted[key]}",
                )
                continue
            wanted[key] = a.port.name
        for key in [k for k, c in self.claims.items() if wanted.get(k) != c.owner]:
            self.claimer.release(self.claims.pop(key).handle)
        for key, owner in wanted.items():
            if key not in self.claims:
                self._claim(key, owner)
        return {c.owner for c in self.claims.values()}

    def _claim(self, key: ClaimKey, owner: ServicePortName) -> None:
        protocol, port = key
        try:
            handle = self.claimer.claim(protocol, port)
        except OSError as err:
            reason = "in use by another process" if err.errno == errno.EADDRINUSE else str(err)
            self._refuse(owner, f"NodePort {port}/{protocol.value} is {reason}")
            return
        self.claims[key] = _Claim(owner, handle)

    def _refuse(self, name: ServicePortName, reason: str) -> None:
        if self._node_port_errors.get(name) != reason:
            log.error(
                "Cannot open the NodePort; the service's other portals still work.",
                service=str(name),
                reason=reason,
            )
        self._node_port_errors[name] = reason

    def handover_fds(self) -> list[tuple[str, int]]:
        return [
            (claim_key(protocol, port, self.config.family), self.claimer.fileno(claim.handle))
            for (protocol, port), claim in self.claims.items()
        ]

    # ------------------------------------------------------------------ shutdown
    async def close(self, *, keep_rules: bool = False) -> None:
        """Release the NodePorts and remove the rules this manager's backend owns (they would
        point at closed ports), unless a successor serves those ports (`keep_rules`)."""
        for claim in self.claims.values():
            self.claimer.release(claim.handle)
        self.claims.clear()
        if self._flushing is not None:
            await tasks.stop_all([self._flushing])
        for fd in self._reserve:
            os.close(fd)
        self._reserve = []
        if not keep_rules:
            try:
                await self.writer.run(self.rules.remove)
            except (RulesError, NftError) as err:
                log.error("Could not remove the portal rules.", reason=str(err))
        self.writer.close()
