"""The orchestrator: keeps one listener per service port in line with the desired state.

Sources call the `on_*` handlers. Service changes are only recorded and applied by `sync()`
(driven by the bounded-frequency runner); endpoint changes reach the balancer at once, and ask
for a sync only when a service port gains its first or loses its last endpoint (the portal
rules differ for services without endpoints).

A listener is rebuilt on a new proxy port when a field of `ServicePort.listener_identity()`
changes; any other change is applied in place. Established TCP connections survive rebuilds
and endpoint changes; they are reset when their service port is removed or the proxy stops.

The proxier is the userspace mode's `Provider`. It owns its portals (kernel rules that send
service traffic to the proxy ports) and its followers (worker processes serving the same
proxy ports, `--workers`), and reports their NodePort clashes and counters in `status()`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

import structlog

from userproxy.balancer import RoundRobinBalancer
from userproxy.changes import EndpointsCache, ServiceChangeTracker, ServiceKey, names_of
from userproxy.convert import EndpointsResult
from userproxy.handover.adoption import Adoption
from userproxy.handover.protocol import listener_key
from userproxy.localaddrs import local_addresses
from userproxy.model import (
    Endpoint,
    Protocol,
    ServicePort,
    ServicePortName,
    is_loopback,
)
from userproxy.ports import PortAllocator, PortsExhausted, make_allocator
from userproxy.provider import (
    Counters,
    CountersSnapshot,
    EndpointStatus,
    ProxyStatus,
    ServicePortStatus,
)
from userproxy.settings import Settings
from userproxy.userspace.loops import OwnAddresses
from userproxy.userspace.portals.interface import ActivePort, Portals
from userproxy.userspace.stats import PortStats, snapshot
from userproxy.userspace.steering import steer_by_client_ip
from userproxy.userspace.tcp import Relay, RelayBudget, TcpProxy, abort_all
from userproxy.userspace.udp import UdpProxy
from userproxy.userspace.wire import DataPlane

log = structlog.get_logger("userproxy.userspace.proxier")

#: How many proxy ports of the range to try when binding one fails (port taken by others).
BIND_ATTEMPTS = 8
#: Hand-over key suffix of a service port's external listener (`externalTrafficPolicy: Local`).
EXTERNAL = "/external"
#: Seconds between looks at the relays left while draining.
DRAIN_POLL = 0.1
#: A sync that opens more service ports than this logs them in one line (each at debug).
LOG_EACH_PORT_UP_TO = 20


class Followers(TypingProtocol):
    """Other processes serving the same proxy ports (`--workers`)."""

    async def start(self) -> None: ...

    def publish(self, state: Callable[[], DataPlane]) -> None:
        """Send the data plane soon (once per loop turn, however many changes)."""
        ...

    def counters(self) -> Counters:
        """Their traffic counters, summed over the processes."""
        ...

    def stop_accepting(self) -> None:
        """A successor serves the proxy ports: take nothing new, relay what is open."""
        ...

    def relays(self) -> int:
        """Connections and flows still open in those processes (as last reported)."""
        ...

    async def stop(self) -> None: ...


@dataclass
class PortRuntime:
    port: ServicePort
    proxy_port: int
    listener: TcpProxy | UdpProxy
    stats: PortStats
    connections: set[Relay] = field(default_factory=set)
    #: `externalTrafficPolicy: Local`: the listener external paths go to (local endpoints).
    external: TcpProxy | UdpProxy | None = None
    external_port: int = 0

    def listeners(self) -> list[TcpProxy | UdpProxy]:
        return [self.listener] if self.external is None else [self.listener, self.external]


def _configure(listener: TcpProxy | UdpProxy, port: ServicePort) -> None:
    """What a listener takes from its service port without being rebuilt."""
    if isinstance(listener, TcpProxy):
        listener.proxy_protocol = port.proxy_protocol


def is_node_client(ip: str) -> bool:
    """Whether a client connects from this node (loopback or one of the node's addresses)."""
    return is_loopback(ip) or ip in local_addresses()


class Proxier:
    mode = "userspace"

    def __init__(
        self,
        *,
        settings: Settings,
        balancer: RoundRobinBalancer | None = None,
        allocator: PortAllocator | None = None,
        clock: Callable[[], float] = time.monotonic,
        portals: Portals | None = None,
        followers: Followers | None = None,
        relay_budget: RelayBudget | None = None,
        adoption: Adoption | None = None,
    ) -> None:
        self.settings = settings
        #: Sockets and proxy ports inherited from a predecessor, until the first sync is done.
        self.adoption = adoption
        self.balancer = balancer or RoundRobinBalancer(is_node_client=is_node_client)
        #: The endpoints on this node, for external traffic of `externalTrafficPolicy: Local`.
        self.external_balancer = RoundRobinBalancer(is_node_client=is_node_client)
        self.allocator = allocator or make_allocator(settings.port_range)
        self.clock = clock
        self.portals = portals
        self.tracker = ServiceChangeTracker()
        self.endpoints = EndpointsCache()
        self.runtimes: dict[ServicePortName, PortRuntime] = {}
        #: Service ports whose listener could not be opened, with the reason.
        self.failed: dict[ServicePortName, str] = {}
        #: Those service ports themselves, tried again at every sync.
        self.unserved: dict[ServicePortName, ServicePort] = {}
        self.request_sync: Callable[[], None] = lambda: None
        self.followers = followers
        #: Relays this process may hold at once (see `tcp.RelayBudget`); listeners count too.
        self.relay_budget = relay_budget or RelayBudget()
        self._lock = asyncio.Lock()
        #: Where this proxy answers (see `loops`), kept current as listeners come and go.
        self._proxy_ports: Counter[int] = Counter()
        self._service_addresses: Counter[tuple[str, int]] = Counter()
        self._node_ports: Counter[int] = Counter()
        self._own = OwnAddresses(
            local=local_addresses() if settings.wildcard_bind else frozenset(),
            bind_address=None if settings.wildcard_bind else settings.bind_address,
            proxy_ports=self._proxy_ports,
            service_addresses=self._service_addresses,
            node_ports=self._node_ports,
        )
        self._reported: set[tuple[ServicePortName, Endpoint]] = set()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.followers is not None:
            await self.followers.start()

    async def close(self, *, keep_rules: bool = False) -> None:
        """Stop the followers, remove the portals (their rules would point at closed ports,
        unless a successor serves those ports: `keep_rules`), then close every listener and
        connection."""
        if self.followers is not None:
            await self.followers.stop()
        if self.portals is not None:
            await self.portals.close(keep_rules=keep_rules)
        await self.shutdown()

    # ------------------------------------------------------------------ hand-over
    def listener_ports(self) -> dict[str, int]:
        out = {}
        for name, rt in self.runtimes.items():
            key = listener_key(name, rt.port.protocol, rt.port.family)
            out[key] = rt.proxy_port
            if rt.external is not None:
                out[key + EXTERNAL] = rt.external_port
        return out

    def handover_fds(self) -> list[tuple[str, int]]:
        fds = []
        for name, rt in self.runtimes.items():
            key = listener_key(name, rt.port.protocol, rt.port.family)
            for suffix, listener in (("", rt.listener), (EXTERNAL, rt.external)):
                if listener is not None and listener.sock is not None:
                    fds.append((key + suffix, listener.sock.fileno()))
        if self.portals is not None:
            fds += self.portals.handover_fds()
        return fds

    def stop_accepting(self, *, shared: bool = True) -> None:
        """A successor serves the proxy ports: take no new connection or flow. `shared`: the
        successor holds these very sockets (the leader's); a worker's own sockets must leave
        their SO_REUSEPORT group instead, or the kernel would keep queueing new clients there."""
        for runtime in self.runtimes.values():
            for listener in runtime.listeners():
                listener.stop_accepting(keep_socket=shared)
        if self.followers is not None:
            self.followers.stop_accepting()

    def relays(self) -> int:
        """Connections and UDP flows still open in this process and its workers."""
        mine = sum(lst.active for rt in self.runtimes.values() for lst in rt.listeners())
        return mine + (self.followers.relays() if self.followers is not None else 0)

    async def drain(self, timeout: float) -> int:
        """Wait until every relay has ended or `timeout` seconds passed; returns how many are
        left (they are cut when the proxier closes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A poll: relays end in many places, none of which should know about draining.
        while (left := self.relays()) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(min(DRAIN_POLL, max(0.0, deadline - loop.time())))
        return left

    def _settle_adoption(self) -> None:
        """After the first sync: inherited sockets no service took are closed."""
        if self.adoption is None:
            return
        adoption, self.adoption = self.adoption, None
        unused = adoption.close_rest()
        if adoption.adopted or unused:
            log.info("Adopted the listening sockets of the previous process.",
                     adopted=adoption.adopted, closed_unused=unused)  # fmt: skip

    def _data_plane_changed(self) -> None:
        if self.followers is not None:
            self.followers.publish(self.data_plane)

    # ------------------------------------------------------------------ source handlers
    def on_service(self, key: ServiceKey, ports: tuple[ServicePort, ...] | None) -> None:
        self.tracker.record(key, ports)
        self.request_sync()

    def on_endpoints(self, result: EndpointsResult) -> None:
        self.endpoints.update(result)
        self._push_endpoints(result.service)

    def on_endpoints_deleted(self, service: ServiceKey, source: str) -> None:
        self.endpoints.delete(service, source)
        self._push_endpoints(service)

    # ------------------------------------------------------------------ sync
    async def sync(self) -> None:
        """Apply the recorded service changes, then re-assert the portal rules.

        New listeners are bound (and listening) before the rules that send traffic to them
        are written, and are registered with the event loop while the kernel write runs:
        connections that arrive in between wait in the listen backlog."""
        async with self._lock:
            bound: list[PortRuntime] = []
            self._refresh_local_addresses()
            changes = self.tracker.take()
            for key, (previous, current) in changes.items():
                await self._apply_change(key, names_of(previous), names_of(current), bound)
            self._retry_unserved(changes.keys(), bound)
            self.balancer.cleanup_stale_sessions(self.clock())
            portals = await self._start_portal_sync()
            try:
                await self._start_listeners(bound)
                self._data_plane_changed()
            finally:
                if portals is not None:
                    await portals
                self._settle_adoption()

    async def _start_portal_sync(self) -> asyncio.Future[None] | None:
        if self.portals is None:
            return None
        task = asyncio.ensure_future(self.portals.sync(self.active_ports()))
        # One turn of the loop: the task builds the rules and hands the write to its thread.
        await asyncio.sleep(0)
        return task

    async def _apply_change(
        self,
        key: ServiceKey,
        previous: dict[ServicePortName, ServicePort],
        current: dict[ServicePortName, ServicePort],
        bound: list[PortRuntime],
    ) -> None:
        for name in previous.keys() - current.keys():
            await self._remove(name)
        for port in current.values():
            self._merge(port, bound)
        self._push_endpoints(key)

    def _merge(self, port: ServicePort, bound: list[PortRuntime]) -> None:
        runtime = self.runtimes.get(port.name)
        self.balancer.set_affinity(port.name, port.affinity)
        self.external_balancer.set_affinity(port.name, port.affinity)
        if runtime is not None and runtime.port.listener_identity() == port.listener_identity():
            runtime.port = port
            _configure(runtime.listener, port)
            return
        stats, connections = PortStats(), set[Relay]()
        if runtime is not None:
            # Rebuild: the established connections and the counters carry over.
            self._close_listener(runtime)
            stats, connections = runtime.stats, runtime.connections
            del self.runtimes[port.name]
        opened = self._open(port, stats, connections)
        if opened is not None:
            bound.append(opened)

    def _retry_unserved(self, changed: Iterable[ServiceKey], bound: list[PortRuntime]) -> None:
        """Service ports that could not get a proxy port are tried again at every sync (the
        port range may have room again), not only when their Service changes."""
        skip = set(changed)
        for port in list(self.unserved.values()):
            if port.name.service not in skip:
                self._merge(port, bound)

    def _open(
        self, port: ServicePort, stats: PortStats, connections: set[Relay]
    ) -> PortRuntime | None:
        try:
            listener, proxy_port = self._listen(port, stats, connections)
        except (OSError, PortsExhausted) as err:
            self._not_served(port, err)
            return None
        external, external_port = None, 0
        if port.external_local_in_force:
            try:
                external, external_port = self._listen(port, stats, connections, external=True)
            except (OSError, PortsExhausted) as err:
                listener.close_listener()
                self.allocator.release(proxy_port)
                self._not_served(port, err)
                return None
        self.failed.pop(port.name, None)
        self.unserved.pop(port.name, None)
        runtime = self.runtimes[port.name] = PortRuntime(
            port, proxy_port, listener, stats, connections, external, external_port
        )
        self._track(runtime, 1)
        if external is not None:
            self._push_local_endpoints(port.name)
        return runtime

    def _not_served(self, port: ServicePort, err: Exception) -> None:
        name = port.name
        self.unserved[name] = port
        if self.failed.get(name) == str(err):
            return  # said already; retried at every sync
        self.failed[name] = str(err)
        log.error(
            "Could not open a proxy port for the service port; it is not served.",
            service=str(name),
            reason=str(err),
        )

    async def _start_listeners(self, bound: list[PortRuntime]) -> None:
        started: list[PortRuntime] = []
        for runtime in bound:
            try:
                for listener in runtime.listeners():
                    await listener.start()
            except OSError as err:
                self.runtimes.pop(runtime.port.name, None)
                self._close_listener(runtime)
                self._not_served(runtime.port, err)
                continue
            started.append(runtime)
        self._log_serving(started)

    def _log_serving(self, started: list[PortRuntime]) -> None:
        """One line per new service port, or one summary when a sync opens many (a node's
        first sync can open thousands)."""
        each = log.info if len(started) <= LOG_EACH_PORT_UP_TO else log.debug
        for runtime in started:
            port = runtime.port
            each(
                "Serving the service port.",
                service=str(port.name),
                protocol=port.protocol.value,
                cluster_ip=port.cluster_ip,
                port=port.port,
                proxy_port=runtime.proxy_port,
            )
        if len(started) > LOG_EACH_PORT_UP_TO:
            udp = sum(1 for rt in started if rt.port.protocol is Protocol.UDP)
            log.info(
                "Serving new service ports (one line each at debug level).",
                count=len(started),
                tcp=len(started) - udp,
                udp=udp,
            )

    def _listen(
        self,
        port: ServicePort,
        stats: PortStats,
        connections: set[Relay],
        *,
        external: bool = False,
    ) -> tuple[TcpProxy | UdpProxy, int]:
        inherited = self._inherited(port, stats, connections, external=external)
        if inherited is not None:
            return inherited
        last_error: OSError | None = None
        for _ in range(BIND_ATTEMPTS):
            wanted = self.allocator.allocate()
            listener = self._make_listener(port, stats, connections, external=external)
            try:
                bound = self._bind(listener, wanted)
            except OSError as err:
                # Someone else holds this port of the range: keep it marked and try another.
                last_error = err
                continue
            return listener, bound
        assert last_error is not None
        raise last_error

    def _inherited(
        self,
        port: ServicePort,
        stats: PortStats,
        connections: set[Relay],
        *,
        external: bool = False,
    ) -> tuple[TcpProxy | UdpProxy, int] | None:
        """The predecessor's socket for this service port, or a bind to the proxy port it
        had (after a crash: the rules it left point there)."""
        if self.adoption is None:
            return None
        key = listener_key(port.name, port.protocol, port.family) + (EXTERNAL if external else "")
        sock = self.adoption.take(key)
        wanted = None if sock is not None else self.adoption.port(key)
        if sock is None and wanted is None:
            return None  # nothing inherited for this one (the common case of a cold start)
        listener = self._make_listener(port, stats, connections, external=external)
        if sock is not None:
            proxy_port = listener.adopt(sock)
            self.allocator.claim(proxy_port)
            workers = self.settings.userspace.workers
            if workers > 1:
                steer_by_client_ip(sock, workers)
            return listener, proxy_port
        if wanted is None or not self.allocator.claim(wanted):
            return None
        try:
            return listener, self._bind(listener, wanted)
        except OSError:
            return None  # taken meanwhile: the port stays marked, a fresh one is picked

    def _bind(self, listener: TcpProxy | UdpProxy, port: int) -> int:
        workers = self.settings.userspace.workers
        bound = listener.bind(
            host=self.settings.bind_address,
            port=port,
            family=self.settings.bind_family,
            reuse_port=self.settings.userspace.workers_reuse_port or workers > 1,
        )
        if workers > 1 and listener.sock is not None:
            steer_by_client_ip(listener.sock, workers)
        return bound

    async def follow(self, state: Sequence[tuple[ServicePort, int, list[Endpoint]]]) -> None:
        """A worker's sync: serve exactly these service ports on these proxy ports (the
        leader's), with these endpoints."""
        async with self._lock:
            wanted = {port.name: (port, proxy_port, eps) for port, proxy_port, eps in state}
            for name, rt in list(self.runtimes.items()):
                if name not in wanted or wanted[name][1] != rt.proxy_port:
                    await self._remove(name)
            for name, (port, proxy_port, eps) in wanted.items():
                self.balancer.set_affinity(name, port.affinity)
                if name not in self.runtimes:
                    stats, connections = PortStats(), set[Relay]()
                    listener = self._make_listener(port, stats, connections)
                    try:
                        self._bind(listener, proxy_port)
                        await listener.start()
                    except OSError as err:
                        listener.close_listener()
                        log.error("A worker could not open a proxy port.", service=str(name),
                                  proxy_port=proxy_port, reason=str(err))  # fmt: skip
                        continue
                    self.runtimes[name] = PortRuntime(
                        port, proxy_port, listener, stats, connections
                    )
                self.balancer.update_endpoints(name, eps)

    def data_plane(self) -> DataPlane:
        """What workers need: each served port, its proxy port and its endpoints."""
        return [
            (rt.port, rt.proxy_port, list(self.balancer.endpoints(name)))
            for name, rt in sorted(self.runtimes.items())
        ]

    def _make_listener(
        self,
        port: ServicePort,
        stats: PortStats,
        connections: set[Relay],
        *,
        external: bool = False,
    ) -> TcpProxy | UdpProxy:
        balancer = self.external_balancer if external else self.balancer
        if port.protocol is Protocol.TCP:
            tcp = TcpProxy(
                name=port.name,
                balancer=balancer,
                stats=stats,
                connections=connections,
                clock=self.clock,
                budget=self.relay_budget,
            )
            _configure(tcp, port)
            return tcp
        return UdpProxy(
            name=port.name,
            balancer=balancer,
            stats=stats,
            clock=self.clock,
            idle_timeout=self.settings.udp_idle_timeout,
            budget=self.relay_budget,
        )

    def _close_listener(self, runtime: PortRuntime) -> None:
        runtime.listener.close_listener()
        self.allocator.release(runtime.proxy_port)
        if runtime.external is not None:
            runtime.external.close_listener()
            self.allocator.release(runtime.external_port)
        self._track(runtime, -1)

    async def _remove(self, name: ServicePortName) -> None:
        self.failed.pop(name, None)
        self.unserved.pop(name, None)
        self.balancer.delete_service(name)
        self.external_balancer.delete_service(name)
        runtime = self.runtimes.pop(name, None)
        if runtime is None:
            return
        self._close_listener(runtime)
        abort_all(runtime.connections)
        log.info("Stopped serving the service port.", service=str(name))
        if self.portals is not None:
            await self.portals.port_removed(runtime.port)

    # ------------------------------------------------------------------ endpoints
    def _push_endpoints(self, service: ServiceKey) -> None:
        names = self.endpoints.port_names(service) | {
            port.name for port in self.tracker.applied(service)
        }
        for name in names:
            runtime = self.runtimes.get(name)
            local = self.settings.node_name if runtime and runtime.port.internal_local else None
            had_endpoints = bool(self.balancer.endpoints(name))
            found = self.endpoints.endpoints(
                name, local_node=local, topology=self.settings.topology
            )
            endpoints = self._without_loops(name, found)
            if runtime is None and not endpoints and not self.balancer.has_service(name):
                continue
            self.balancer.update_endpoints(name, endpoints)
            self._data_plane_changed()
            if runtime is not None and had_endpoints != bool(endpoints):
                self.request_sync()
            if runtime is not None and runtime.external is not None:
                self._push_local_endpoints(name)

    def _push_local_endpoints(self, name: ServicePortName) -> None:
        """`externalTrafficPolicy: Local`: external traffic's endpoints are this node's."""
        node = self.settings.node_name
        local = self._without_loops(name, self.endpoints.endpoints(name, local_node=node))
        had_local = bool(self.external_balancer.endpoints(name))
        self.external_balancer.update_endpoints(name, local)
        if had_local != bool(local):
            self.request_sync()  # the portals drop external traffic while there is none

    def _without_loops(self, name: ServicePortName, endpoints: list[Endpoint]) -> list[Endpoint]:
        own = self._own
        kept = []
        for endpoint in endpoints:
            reason = own.loop(endpoint)
            if reason is None:
                kept.append(endpoint)
                self._note_node_only(name, endpoint)
            elif (name, endpoint) not in self._reported:
                self._reported.add((name, endpoint))
                log.error("Refused an endpoint that leads back into this proxy.",
                          service=str(name), reason=reason)  # fmt: skip
        return kept

    def _note_node_only(self, name: ServicePortName, endpoint: Endpoint) -> None:
        if not is_loopback(endpoint.ip) or (name, endpoint) in self._reported:
            return
        self._reported.add((name, endpoint))
        log.info("An endpoint on loopback is served only to clients on this node; pods and "
                    "other hosts are sent to the service's other endpoints.",
                    service=str(name), endpoint=str(endpoint))  # fmt: skip

    def _refresh_local_addresses(self) -> None:
        """A wildcard-bound proxy answers on every node address; they can change."""
        if self.settings.wildcard_bind:
            local = local_addresses()
            self._own.local = local

    def _track(self, runtime: PortRuntime, delta: int) -> None:
        """Add (1) or remove (-1) a listener's addresses from the ones loops are checked
        against."""
        port = runtime.port
        self.relay_budget.reserved += delta
        _count(self._proxy_ports, runtime.proxy_port, delta)
        if runtime.external is not None:
            self.relay_budget.reserved += delta
            _count(self._proxy_ports, runtime.external_port, delta)
        if self.portals is not None:
            for ip in (port.cluster_ip, *port.external_ips, *port.load_balancer_ips):
                _count(self._service_addresses, (ip, port.port), delta)
            if port.node_port:
                _count(self._node_ports, port.node_port, delta)

    # ------------------------------------------------------------------ queries and shutdown
    def active_ports(self) -> list[ActivePort]:
        return [
            ActivePort(
                rt.port,
                rt.proxy_port,
                bool(self.balancer.endpoints(name)),
                external_proxy_port=rt.external_port,
                has_local_endpoints=bool(self.external_balancer.endpoints(name)),
            )
            for name, rt in sorted(self.runtimes.items())
        ]

    def status(self) -> ProxyStatus:
        errors = self.portals.node_port_errors() if self.portals is not None else {}
        status = ProxyStatus(
            mode=self.mode,
            service_ports=tuple(
                self._port_status(rt, errors.get(name))
                for name, rt in sorted(self.runtimes.items())
            ),
            failed=tuple(sorted(self.failed.items())),
            pending_service_changes=self.tracker.pending,
        )
        return status.with_counters(self.followers.counters() if self.followers else {})

    def _port_status(self, rt: PortRuntime, node_port_error: str | None) -> ServicePortStatus:
        current = set(self.balancer.endpoints(rt.port.name))
        rows = {
            ep: EndpointStatus(ep, snapshot(c), removed=ep not in current)
            for ep, c in rt.stats.endpoints.items()
        }
        for ep in current:
            rows.setdefault(ep, EndpointStatus(ep, CountersSnapshot()))
        return ServicePortStatus(
            port=rt.port,
            proxy_port=rt.proxy_port,
            has_endpoints=bool(current),
            endpoints=tuple(rows[ep] for ep in sorted(rows)),
            rejected=rt.stats.rejected,
            node_port_error=node_port_error,
            local_endpoints=len(
                self.endpoints.endpoints(rt.port.name, local_node=self.settings.node_name)
            ),
            external_proxy_port=rt.external_port or None,
        )

    async def read_counters(self) -> None:
        """Every counter is live in memory."""

    async def shutdown(self) -> None:
        """Close every listener and connection. Portal rules are the caller's to remove."""
        async with self._lock:
            for name in list(self.runtimes):
                runtime = self.runtimes.pop(name)
                self._close_listener(runtime)
                abort_all(runtime.connections)
                self.balancer.delete_service(name)
        # Let what the aborts scheduled (spliced relays' closes, the event core's) run.
        await asyncio.sleep(0)


def _count(counter: Counter[Any], key: Any, delta: int) -> None:
    left = counter[key] + delta
    if left > 0:
        counter[key] = left
    else:
        counter.pop(key, None)
