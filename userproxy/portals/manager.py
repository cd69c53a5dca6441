"""The portal manager: keeps the kernel's rules and the NodePort claims in line with the
served service ports. It is the proxier's `Portals`.

NodePorts are claimed with a real socket bound on every address (same protocol) for as long as
the service exists, so no other process can take the port and quietly receive traffic meant for
the service; a port already taken, or wanted by two services, is an error for that service only
(its NodePort rules are left out, everything else is served).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import functools
import math
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from userproxy.model import Protocol, ServicePort, ServicePortName
from userproxy.portals import backends
from userproxy.portals.rules import PortalConfig, PortalPort, RuleBuilder, Ruleset
from userproxy.proxier import ActivePort

log = structlog.get_logger("userproxy.portals")

ClaimKey = tuple[Protocol, int]


def detect_host_ip() -> str:
    """The address of the default-route interface (what the old proxier DNATed host traffic to).

    A UDP `connect` only looks up the route; nothing is sent.
    """
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: any routable address does
        return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()


@dataclass
class _Claim:
    owner: ServicePortName
    sock: socket.socket


class PortalManager:
    def __init__(
        self,
        *,
        backend: backends.RuleBackend,
        config: PortalConfig,
        full_sync_period: float = 30.0,
    ) -> None:
        self.backend = backend
        self.config = config
        #: Every sync writes only what changed, except one per this many seconds (and the
        #: first, and any after a failure), which rewrites our chains whole: the heal for
        #: rules someone else deleted (`--iptables-sync-period`).
        self.full_sync_period = full_sync_period
        self._last_full = -math.inf
        self._builder = RuleBuilder(config)
        self.claims: dict[ClaimKey, _Claim] = {}
        #: Why a service port's NodePort is not served (clash), for status and tests.
        self.node_port_errors: dict[ServicePortName, str] = {}
        self.last_ruleset: Ruleset | None = None
        self.applied = 0
        # One thread for every kernel write: libiptc/libxtables keep process-global state that
        # is not safe to use from whichever pool thread happens to run the call (seen: rules
        # silently missing after a re-sync from a different thread).
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="iptables")

    # ------------------------------------------------------------------ Portals protocol
    async def sync(self, active: Sequence[ActivePort]) -> None:
        claimed = self._update_claims(active)
        ruleset = self._builder.build(
            PortalPort(
                a.port, a.proxy_port, a.has_endpoints, node_port_claimed=a.port.name in claimed
            )
            for a in active
        )
        now = time.monotonic()
        # 0.9: the periodic sync arrives a hair under one period after the last full one.
        full = now - self._last_full >= 0.9 * self.full_sync_period
        apply = functools.partial(self.backend.apply, ruleset, full=full)
        try:
            await asyncio.get_running_loop().run_in_executor(self._writer, apply)
        except Exception:
            self._last_full = -math.inf  # the kernel state is unknown: rewrite it whole next
            raise
        if full:
            self._last_full = now
        self.last_ruleset = ruleset
        self.applied += 1

    async def port_removed(self, port: ServicePort) -> None:
        """A UDP service port went away: forget its conntrack entries, or clients keep sending
        into the dead mapping until it times out."""
        if port.protocol is Protocol.UDP:
            await asyncio.get_running_loop().run_in_executor(None, flush_udp_conntrack, port)

    # ------------------------------------------------------------------ NodePort claims
    def _update_claims(self, active: Sequence[ActivePort]) -> set[ServicePortName]:
        wanted: dict[ClaimKey, ServicePortName] = {}
        self.node_port_errors.clear()
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
            self.claims.pop(key).sock.close()
        for key, owner in wanted.items():
            if key not in self.claims:
                self._claim(key, owner)
        return {c.owner for c in self.claims.values()}

    def _claim(self, key: ClaimKey, owner: ServicePortName) -> None:
        protocol, port = key
        kind = socket.SOCK_STREAM if protocol is Protocol.TCP else socket.SOCK_DGRAM
        sock = socket.socket(socket.AF_INET, kind)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as err:
            sock.close()
            reason = "in use by another process" if err.errno == errno.EADDRINUSE else str(err)
            self._refuse(owner, f"NodePort {port}/{protocol.value} is {reason}")
            return
        self.claims[key] = _Claim(owner, sock)

    def _refuse(self, name: ServicePortName, reason: str) -> None:
        if self.node_port_errors.get(name) != reason:
            log.error(
                "Cannot open the NodePort; the service's other portals still work.",
                service=str(name),
                reason=reason,
            )
        self.node_port_errors[name] = reason

    # ------------------------------------------------------------------ shutdown
    async def close(self) -> None:
        """Release the NodePorts and remove every rule (they would point at closed ports)."""
        for claim in self.claims.values():
            claim.sock.close()
        self.claims.clear()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._writer, backends.cleanup)
        except backends.RulesError as err:
            log.error("Could not remove the portal rules.", reason=str(err))
        self._writer.shutdown(wait=True)


def flush_udp_conntrack(port: ServicePort) -> None:
    if shutil.which("conntrack") is None:
        log.warning("conntrack is not installed; stale UDP mappings will only time out.")
        return
    targets = [
        ["--orig-dst", ip, "--orig-port-dst", str(port.port)]
        for ip in (port.cluster_ip, *port.external_ips, *port.load_balancer_ips)
    ]
    if port.node_port:
        targets.append(["--orig-port-dst", str(port.node_port)])
    for target in targets:
        # Exit status 1 only means nothing matched.
        subprocess.run(["conntrack", "-D", "-p", "udp", *target], capture_output=True, check=False)
