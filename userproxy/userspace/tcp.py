"""The TCP data path: one listener per service port, one relay per accepted connection.

A relay is two asyncio Protocols (client side and backend side) that write straight into each
other's transports, so a chunk costs one callback and one `write`. The network behaviour:

- Accepting never waits for dialling: each connection dials in its own task, with failover
  across endpoints (0.25, 0.5, 1 and 2 s attempts, affinity reset after a failure).
- Backpressure: when a side's write buffer passes its high-water mark the other side stops
  reading, and resumes when it drains, so a slow reader holds the proxy to bounded buffers
  (the kernel's socket buffers then push back on the fast sender).
- Bytes a client sends before its backend is up are buffered up to a bound, then its reading is
  paused. (Under uvloop, pausing inside `connection_made` has no effect, so we cannot simply
  not read.)
- Bulk flows move to splice(2): once one direction has moved `SPLICE_AFTER` bytes, the relay
  is handed to `splice.SpliceRelay` (see there), which passes data socket to socket through
  a pipe without copying it into Python. Connection setup and small exchanges stay on
  transports, where they are cheapest.
- A FIN is passed on as a FIN (`write_eof`) while the other direction keeps flowing; once both
  directions are finished both sockets are closed. A reset or error on one side is passed on
  as a reset (SO_LINGER 0 then close) so the peer does not mistake a failure for a clean end.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import struct
from collections.abc import Callable
from typing import cast

import structlog

from userproxy.balancer import BalancerError, RoundRobinBalancer
from userproxy.model import Family, ServicePortName
from userproxy.userspace import proxyproto
from userproxy.userspace.proxyproto import original_destination
from userproxy.userspace.splice import (
    SPLICE_AFTER,
    SpliceRelay,
    descriptor_budget,
    splice_supported,
    take_socket,
)
from userproxy.userspace.stats import EndpointCounters, PortStats
from userproxy.userspace.tcpstate import PAUSED_CHECK_INTERVAL, connection_gone

log = structlog.get_logger("userproxy.tcp")

#: Dial attempts and their timeouts, as in kube-proxy's userspace mode (worst case 3.75 s).
DIAL_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)
#: Client bytes held while the backend connection is being set up.
EARLY_DATA_LIMIT = 256 * 1024
#: Per-transport write buffer: above HIGH the peer stops reading, below LOW it resumes.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024

_LINGER_RESET = struct.pack("ii", 1, 0)


Clock = Callable[[], float]


def reset_transport(transport: asyncio.BaseTransport) -> None:
    """Close with an RST instead of a FIN (SO_LINGER with a zero timeout)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]


class RelayBudget:
    """How many relays this process may hold at once, so that neither a flood nor a proxy loop
    that slipped past the endpoint checks can take the last descriptors: each relay holds two,
    each listener one, and HEADROOM stay free for syncs, the API watch and the exit cleanup.
    Beyond it a new connection is reset at once (and a loop, reset at its newest hop, unwinds
    hop by hop as each reset is passed on)."""

    HEADROOM = 256

    def __init__(self, descriptors: int | None = None) -> None:
        if descriptors is None:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            descriptors = soft if soft != resource.RLIM_INFINITY else 1 << 20
        self.descriptors = descriptors
        #: Descriptors held by other things (listeners), kept current by the owner.
        self.reserved = 0
        self.in_use = 0
        #: Connections reset because the budget was spent.
        self.shed = 0

    def take(self) -> bool:
        if 2 * (self.in_use + 1) + self.reserved + self.HEADROOM > self.descriptors:
            self.shed += 1
            return False
        self.in_use += 1
        return True


class _Side(asyncio.Protocol):
    """What both sides of a relay share: EOF, loss and flow control towards the peer."""

    __slots__ = ("closed", "eof", "handed_off", "moved", "paused_check", "peer", "transport")

    transport: asyncio.Transport
    peer: _Side | None

    def __init__(self) -> None:
        self.peer = None
        self.eof = False
        self.closed = False
        #: Bytes read from this side while on transports.
        self.moved = 0
        #: The connection now belongs to a SpliceRelay; this transport was let go.
        self.handed_off = False
        #: While this side's reading is paused (its peer is back-pressured): the next look
        #: at whether its connection was reset meanwhile.
        self.paused_check: asyncio.TimerHandle | None = None

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None or peer.closed:
            return True
        if peer.eof:
            # Both directions are finished: close both sockets (uvloop needs the full close).
            self.transport.close()
            peer.transport.close()
        else:
            peer.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.closed:
            peer.transport.pause_reading()
            if peer.paused_check is None:
                peer.paused_check = asyncio.get_running_loop().call_later(
                    PAUSED_CHECK_INTERVAL, peer.check_paused
                )

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.closed:
            if peer.paused_check is not None:
                peer.paused_check.cancel()
                peer.paused_check = None
            peer.transport.resume_reading()

    def check_paused(self) -> None:
        """Reading is paused: a reset from this side's peer would go unseen. Look."""
        self.paused_check = None
        if self.closed or self.handed_off:
            return
        if connection_gone(self.transport.get_extra_info("socket")):
            self.tear_down()
            return
        self.paused_check = asyncio.get_running_loop().call_later(
            PAUSED_CHECK_INTERVAL, self.check_paused
        )

    def tear_down(self) -> None:
        """Reset both sides of the relay."""
        raise NotImplementedError

    def _pass_on_loss(self, exc: Exception | None) -> None:
        self.closed = True
        if self.paused_check is not None:  # nothing left to look at
            self.paused_check.cancel()
            self.paused_check = None
        peer = self.peer
        if peer is None or peer.closed:
            return
        if exc is not None:
            reset_transport(peer.transport)
        else:
            peer.transport.close()


class BackendSide(_Side):
    __slots__ = ("client", "counters")

    def __init__(self, client: ClientSide, counters: EndpointCounters) -> None:
        super().__init__()
        self.client = client
        self.counters = counters

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        if self.client.closed:
            transport.abort()
            self.closed = True
            return
        self.client.attach(self)

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)
        self.counters.bytes_to_clients += len(data)
        self.moved += len(data)
        if self.moved >= SPLICE_AFTER:
            self.client.hand_to_splice()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handed_off:
            return
        self._pass_on_loss(exc)
        self.client.finish()

    def tear_down(self) -> None:
        self.client.abort()


class ClientSide(_Side):
    __slots__ = ("counters", "dial", "early", "early_size", "service", "spliced")

    def __init__(self, service: TcpProxy) -> None:
        super().__init__()
        self.service = service
        self.counters: EndpointCounters | None = None
        #: Client bytes that arrived before the backend connection was up (made when needed).
        self.early: list[bytes] | None = None
        self.early_size = 0
        self.dial: asyncio.Task[None] | None = None
        self.spliced: SpliceRelay | None = None

    # ---------------------------------------------------------------- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        if not self.service.budget.take():
            self.service.shed(self)
            return
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.service.connections.add(self)
        self.dial = self.service.loop.create_task(self.service.connect(self))

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None:
            peer.transport.write(data)
            self.counters.bytes_from_clients += len(data)  # type: ignore[union-attr]
            self.moved += len(data)
            if self.moved >= SPLICE_AFTER:
                self.hand_to_splice()
            return
        if self.early is None:
            self.early = []
        self.early.append(data)
        self.early_size += len(data)
        if self.early_size >= EARLY_DATA_LIMIT:
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handed_off:
            return
        self._pass_on_loss(exc)
        if self.dial is not None and not self.dial.done():
            self.dial.cancel()
        self.finish()

    # ---------------------------------------------------------------- relay lifecycle
    def attach(self, backend: BackendSide) -> None:
        """The backend connection is up: start relaying, starting with the early bytes."""
        self.peer = backend
        backend.peer = self
        self.dial = None  # the dial's Task and coroutine would otherwise live as long as we do
        counters = self.counters = backend.counters
        counters.active += 1
        counters.total += 1
        if self.service.proxy_protocol:
            backend.transport.write(self.proxy_header(self.service.proxy_protocol))
        if self.early:
            backend.transport.writelines(self.early)
            counters.bytes_from_clients += self.early_size
            self.early, self.early_size = None, 0
            self.transport.resume_reading()
        if self.eof:
            backend.transport.write_eof()

    def hand_to_splice(self) -> None:
        """Move a bulk relay to splice, if both transports are idle enough to let go."""
        backend = self.peer
        if (
            backend is None
            or self.spliced is not None
            or self.closed
            or backend.closed
            or self.eof
            or backend.eof
            or self.transport.get_write_buffer_size()
            or backend.transport.get_write_buffer_size()
            or not splice_supported()
            or SpliceRelay.active >= self.service.splice_budget
        ):
            return
        try:
            client_sock = take_socket(self.transport)
        except OSError:
            return
        try:
            backend_sock = take_socket(backend.transport)
        except OSError:
            client_sock.close()
            return
        counters = self.counters
        assert counters is not None

        def to_backend(size: int) -> None:
            counters.bytes_from_clients += size

        def to_client(size: int) -> None:
            counters.bytes_to_clients += size

        try:
            relay = SpliceRelay(
                self.service.loop,
                client_sock,
                backend_sock,
                to_backend=to_backend,
                to_client=to_client,
                on_closed=self._splice_closed,
            )
        except OSError:  # no descriptors for the pipes: stay on the transports
            client_sock.close()
            backend_sock.close()
            return
        self.handed_off = backend.handed_off = True
        # Closing the transports closes their descriptors only: ours keep both connections.
        self.transport.abort()
        backend.transport.abort()
        self.spliced = relay
        relay.start()

    def _splice_closed(self) -> None:
        self.spliced = None
        self.closed = True
        if self.peer is not None:
            self.peer.closed = True
        self.finish()

    def refuse(self) -> None:
        """No endpoint could take the connection: reset it so the client sees a failure."""
        if not self.closed:
            reset_transport(self.transport)

    def finish(self) -> None:
        """Account for the relay once every socket of it is closed."""
        peer = self.peer
        if not self.closed or (peer is not None and not peer.closed):
            return
        if self in self.service.connections:
            self.service.connections.discard(self)
            self.service.budget.in_use -= 1
            if self.counters is not None:
                self.counters.active -= 1
        # Unlink the two sides so the relay is freed by reference counting: objects left in
        # cycles would make the cycle collector run every few dozen connections.
        self.peer = self.dial = None
        if peer is not None:
            peer.peer = None

    def tear_down(self) -> None:
        self.abort()

    def abort(self) -> None:
        """Tear the relay down now (service removed or proxy stopping): reset both sides."""
        if self.spliced is not None:
            self.spliced.reset()
            return
        if self.dial is not None and not self.dial.done():
            self.dial.cancel()
        for side in (self, self.peer):
            if side is not None and not side.closed:
                reset_transport(side.transport)

    @property
    def client_ip(self) -> str:
        peer = self.transport.get_extra_info("peername")
        return str(peer[0]) if peer else ""

    def proxy_header(self, version: int) -> bytes:
        """The PROXY protocol header: this client, and the service address it dialled (the
        proxy port itself when no portal redirected it)."""
        transport = self.transport
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        dialled = original_destination(sock) if sock is not None else None
        if dialled is None:
            dialled = transport.get_extra_info("sockname")[:2]
        return proxyproto.header(version, (peer[0], peer[1]), (dialled[0], dialled[1]))


class TcpProxy:
    """The listener of one TCP service port and the relays it accepted."""

    def __init__(
        self,
        *,
        name: ServicePortName,
        balancer: RoundRobinBalancer,
        stats: PortStats,
        connections: set[ClientSide],
        clock: Clock,
        dial_timeouts: tuple[float, ...] = DIAL_TIMEOUTS,
        budget: RelayBudget | None = None,
    ) -> None:
        self.name = name
        #: PROXY protocol version sent to backends first (0: none); see `proxyproto`.
        self.proxy_protocol = 0
        self.budget = budget or RelayBudget()
        self.balancer = balancer
        self.stats = stats
        self.connections = connections
        self.clock = clock
        self.dial_timeouts = dial_timeouts
        #: Relays that may be spliced at once, in this process (see `splice.descriptor_budget`).
        self.splice_budget = descriptor_budget()
        self._warned_at = self._shed_warned_at = float("-inf")
        self._unlogged = 0
        self.loop = asyncio.get_running_loop()
        self._server: asyncio.Server | None = None
        #: The listening socket, once listening.
        self.sock: socket.socket | None = None

    def bind(
        self, *, host: str, port: int, family: Family = Family.IPv4, reuse_port: bool = False
    ) -> int:
        """Bind and listen; returns the bound port (the kernel's choice for port 0). From here
        the kernel queues connections in the backlog until `start()` accepts them.

        The socket is made here rather than by `create_server(host=...)`, which resolves the
        address through getaddrinfo in a thread: 0.5 ms per listener, 5 s for 10,000."""
        sock = self.sock = listening_socket(host, port, family, reuse_port=reuse_port)
        return int(sock.getsockname()[1])

    async def start(self) -> None:
        """Accept on the bound socket."""
        assert self.sock is not None, "bind() first"
        try:
            self._server = await self.loop.create_server(
                lambda: ClientSide(self), sock=self.sock, backlog=socket.SOMAXCONN
            )
        except BaseException:
            self.sock.close()
            self.sock = None
            raise

    async def connect(self, client: ClientSide) -> None:
        client_ip = client.client_ip
        for attempt, timeout in enumerate(self.dial_timeouts):
            try:
                endpoint = self.balancer.next_endpoint(
                    self.name, client_ip, now=self.clock(), reset=attempt > 0
                )
            except BalancerError:
                self.stats.rejected += 1
                client.refuse()
                return
            counters = self.stats.endpoint(endpoint)
            try:
                async with asyncio.timeout(timeout):
                    await self.loop.create_connection(
                        lambda c=counters: BackendSide(client, c),  # type: ignore[misc]
                        endpoint.ip,
                        endpoint.port,
                    )
                return
            except (OSError, TimeoutError) as err:
                counters.dial_failures += 1
                log.debug(
                    "Dialling an endpoint failed; trying the next one.",
                    service=str(self.name),
                    endpoint=str(endpoint),
                    attempt=attempt + 1,
                    error=_describe(err),
                )
        self._warn_unaccepted()
        client.refuse()

    def shed(self, client: ClientSide) -> None:
        """Out of relay budget: reset the new connection at once, say so once a second."""
        client.closed = True
        reset_transport(client.transport)
        now = self.loop.time()
        if now - self._shed_warned_at >= 1.0:
            self._shed_warned_at = now
            log.warning(
                "Out of descriptors for new relays; resetting new connections.",
                service=str(self.name),
                relays=self.budget.in_use,
                shed_so_far=self.budget.shed,
            )

    def _warn_unaccepted(self) -> None:
        """At most one line a second per service port (out of descriptors, every new
        connection fails this way), with how many were not logged."""
        now = self.loop.time()
        if now - self._warned_at < 1.0:
            self._unlogged += 1
            return
        log.warning(
            "No endpoint accepted the connection; closing it.",
            service=str(self.name),
            attempts=len(self.dial_timeouts),
            more_since_last_line=self._unlogged or None,
        )
        self._warned_at, self._unlogged = now, 0

    def adopt(self, sock: socket.socket) -> int:
        """Take over a listening socket a predecessor handed over: bound and listening, its
        backlog intact. Returns its port."""
        sock.setblocking(False)
        self.sock = sock
        return int(sock.getsockname()[1])

    @property
    def active(self) -> int:
        """Relays still open."""
        return len(self.connections)

    def stop_accepting(self, *, keep_socket: bool = True) -> None:
        """A successor accepts on the same port now; established relays keep running. (A
        listening socket is only closed here either way: the successor holds its own copy.)"""
        self.close_listener()

    def close_listener(self) -> None:
        """Stop accepting; established relays keep running."""
        if self._server is not None:
            self._server.close()  # closes the socket too
            self._server = None
        elif self.sock is not None:
            self.sock.close()  # bound but never started
        self.sock = None


def listening_socket(
    host: str, port: int, family: Family, *, reuse_port: bool = False
) -> socket.socket:
    """A non-blocking TCP socket bound and listening (IPv6 ones IPv6-only: the IPv4 side has
    listeners of its own)."""
    sock = socket.socket(family.socket_family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family is Family.IPv6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _describe(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "timed out"
    return err.strerror or type(err).__name__ if isinstance(err, OSError) else repr(err)


def abort_all(connections: set[ClientSide]) -> None:
    for conn in list(connections):
        conn.abort()
