"""`Provider`: what every proxy mode implements (the role of kube-proxy's `proxy.Provider`),
and `ProxyStatus`, the snapshot every observer reads. Pure.

A provider takes the sources' changes (`SourceSink`), applies them in `sync()` (driven by
the bounded-frequency runner), reports what it serves in `status()`, and lets go of
everything in `close()`. Metrics, `/status`, `userproxy ls`, `UserProxy.counters` and the
worker processes' reports read only `ProxyStatus`; nothing outside a provider's own package
asks which mode it is.

Adding a proxy mode: implement `Provider` in a package of its own and register its factory
in `userproxy.modes`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from userproxy.model import Endpoint, ServicePort, ServicePortName
from userproxy.sources.handlers import SourceSink


class StartupError(Exception):
    """A provider cannot run on this host as configured; the message says what to do."""


@dataclass(frozen=True, slots=True)
class CountersSnapshot:
    """Traffic through one endpoint. For UDP, `active` and `total` count client flows."""

    active: int = 0
    total: int = 0
    bytes_from_clients: int = 0
    bytes_to_clients: int = 0
    dial_failures: int = 0

    def __add__(self, other: CountersSnapshot) -> CountersSnapshot:
        return CountersSnapshot(
            self.active + other.active,
            self.total + other.total,
            self.bytes_from_clients + other.bytes_from_clients,
            self.bytes_to_clients + other.bytes_to_clients,
            self.dial_failures + other.dial_failures,
        )


#: Counters of other processes (`--workers`): service port (by name) -> endpoint -> counters.
Counters = dict[str, dict[Endpoint, CountersSnapshot]]


@dataclass(frozen=True)
class EndpointStatus:
    endpoint: Endpoint
    #: What the proxy relayed; None where the kernel carries the traffic.
    counters: CountersSnapshot | None = None
    #: Connections the kernel sent there, where it counts them (iptables mode).
    kernel_connections: int | None = None
    #: Out of rotation, but still has counters (connections that outlive it, or history).
    removed: bool = False


@dataclass(frozen=True)
class ServicePortStatus:
    port: ServicePort
    #: The local port that serves it; None where the kernel carries the traffic.
    proxy_port: int | None
    has_endpoints: bool
    endpoints: tuple[EndpointStatus, ...] = ()
    #: Connections or datagrams turned away for lack of endpoints; None where not counted.
    rejected: int | None = None
    #: Why the NodePort is not served (a clash), if it is not.
    node_port_error: str | None = None
    #: Ready endpoints on this node (what the service health check reports).
    local_endpoints: int = 0
    #: Where external traffic is served under `externalTrafficPolicy: Local` (userspace).
    external_proxy_port: int | None = None

    @property
    def name(self) -> ServicePortName:
        return self.port.name

    def totals(self) -> CountersSnapshot:
        return sum(
            (e.counters for e in self.endpoints if e.counters is not None), CountersSnapshot()
        )


@dataclass(frozen=True)
class RefusedObject:
    kind: str
    namespace: str
    name: str
    origin: str
    reason: str


@dataclass(frozen=True)
class ProxyStatus:
    mode: str
    service_ports: tuple[ServicePortStatus, ...] = ()
    #: Service ports that could not be served, with the reason.
    failed: tuple[tuple[ServicePortName, str], ...] = ()
    #: Service changes recorded and not yet applied by a sync.
    pending_service_changes: int = 0
    #: Objects the sources gave that were refused, with where they came from and why.
    refused: tuple[RefusedObject, ...] = ()
    #: Failures the mode counts by name (`nftables_sync`: transactions nft refused), exported
    #: as `kubeproxy_sync_proxy_rules_<name>_failures_total`.
    failures: tuple[tuple[str, int], ...] = ()

    def find(self, name: str | ServicePortName) -> ServicePortStatus | None:
        for sp in self.service_ports:
            if sp.port.name == name or str(sp.port.name) == name:
                return sp
        return None

    def with_counters(self, others: Counters) -> ProxyStatus:
        """This process's counters plus other processes' (the one place they are merged)."""
        if not others:
            return self
        return replace(self, service_ports=tuple(_merged(sp, others) for sp in self.service_ports))


def _merged(sp: ServicePortStatus, others: Counters) -> ServicePortStatus:
    theirs = others.get(str(sp.port.name))
    if not theirs:
        return sp
    rows = {e.endpoint: e for e in sp.endpoints}
    for endpoint, extra in theirs.items():
        mine = rows.get(endpoint)
        if mine is None:
            rows[endpoint] = EndpointStatus(endpoint, extra, removed=True)
        elif mine.counters is not None:
            rows[endpoint] = replace(mine, counters=mine.counters + extra)
    return replace(sp, endpoints=tuple(rows[e] for e in sorted(rows)))


class Provider(SourceSink, Protocol):
    #: The mode's name, as `--proxy-mode` spells it (served at `/proxyMode`).
    mode: str
    #: Set by the owner: asks the runner for a sync soon (endpoint changes that need one).
    request_sync: Callable[[], None]

    async def start(self) -> None:
        """Prepare to serve (helper processes, say), before the first sync."""
        ...

    async def sync(self) -> None:
        """Apply the recorded changes; raising keeps them queued and the sync is retried."""
        ...

    def status(self) -> ProxyStatus:
        """A snapshot of what is served, from memory (cheap; tests poll it)."""
        ...

    async def read_counters(self) -> None:
        """Bring counters kept outside the process (the kernel's) up to date before a
        `status()`; a no-op where every counter is live in memory."""
        ...

    async def close(self, *, keep_rules: bool = False) -> None:
        """Stop serving: close listeners and connections, release what was claimed. Whether
        kernel rules stay (so traffic flows across a restart) is the mode's to decide;
        `keep_rules` (a successor serves them) means they stay."""
        ...

    # Hand-over to a successor process (`userproxy.handover`).
    def listener_ports(self) -> dict[str, int]:
        """The proxy port of every listener, by hand-over key (empty in the kernel modes)."""
        ...

    def handover_fds(self) -> list[tuple[str, int]]:
        """Every listening descriptor a successor adopts, by hand-over key."""
        ...

    def stop_accepting(self) -> None:
        """A successor serves the same sockets now: take no new connection or flow."""
        ...

    async def drain(self, timeout: float) -> int:
        """Wait for open relays to end, up to `timeout` seconds; returns how many are left."""
        ...
