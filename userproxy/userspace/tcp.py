"""The TCP data path: one listener per service port, one relay per accepted connection, all on
the process's own edge-triggered epoll (`eventcore`): raw non-blocking sockets, registered once,
no Task, future or timer per connection.

The network behaviour:
- Accepting never waits for dialling: the listener accepts in batches until the kernel's queue
  is empty; each connection dials with a non-blocking connect, with failover across endpoints
  (0.25, 0.5, 1 and 2 s attempts, affinity reset after a failure); the timeouts are entries
  in the core's one deadline heap.
- Backpressure: a direction holds at most one read's worth of bytes (`CHUNK`) that its
  destination could not take; it stops reading until the destination's next "writable" edge
  has taken them, so a slow reader holds the proxy to that (the kernel's socket buffers then
  push back on the fast sender). A reset on a side nobody is reading still arrives, as an
  EPOLLERR edge.
- Bytes a client sends before its backend is up are held up to `EARLY_DATA_LIMIT`, then its
  reading waits for the backend.
- Bulk flows move to splice(2): once one direction has moved `SPLICE_AFTER` bytes, both
  sockets are handed to `splice.SpliceRelay`, which passes data socket to socket through a
  pipe without copying it into Python.
- A FIN is passed on as a FIN (shutdown SHUT_WR, once what was read before it is written)
  while the other direction keeps flowing; once both directions are finished both sockets are
  closed. A reset or error on one side is passed on as a reset (SO_LINGER 0 then close) so the
  peer does not mistake a failure for a clean end. EPOLLRDHUP with a short read ends a
  direction without a further read.
- TCP_NODELAY on both sides, as the old proxy and every transport-based relay set it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import resource
import socket
import struct
from collections.abc import Callable

import structlog

from userproxy.balancer import BalancerError, RoundRobinBalancer
from userproxy.model import Family, ServicePortName
from userproxy.userspace import eventcore, proxyproto
from userproxy.userspace.eventcore import (
    CONNECTION_EVENTS,
    EPOLLERR,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
    EPOLLRDHUP,
    LISTENER_EVENTS,
    EventCore,
)
from userproxy.userspace.proxyproto import original_destination
from userproxy.userspace.splice import (
    SPLICE_AFTER,
    SpliceRelay,
    descriptor_budget,
    splice_supported,
)
from userproxy.userspace.stats import EndpointCounters, PortStats

log = structlog.get_logger("userproxy.tcp")

#: Dial attempts and their timeouts, as in kube-proxy's userspace mode (worst case 3.75 s).
DIAL_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)
#: Client bytes held while the backend connection is being set up.
EARLY_DATA_LIMIT = 256 * 1024
#: One read: the most a direction holds when its destination is full.
CHUNK = 256 * 1024
#: Reads per direction per turn before other connections get theirs.
READS_PER_TURN = 16
#: Connections accepted per listener per turn.
ACCEPTS_PER_TURN = 64

_LINGER_RESET = struct.pack("ii", 1, 0)
_NONBLOCKING_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_IN_PROGRESS = (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK)

Clock = Callable[[], float]


def set_reset_on_close(sock: socket.socket) -> None:
    """Make the next close send an RST instead of a FIN (SO_LINGER with a zero timeout)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


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


class _Direction:
    """One way through a relay: reading `src`, writing `dst`."""

    __slots__ = ("eof", "moved", "pending", "rdhup", "readable", "shut")

    def __init__(self) -> None:
        #: An edge said there is something to read, and no read has found the queue empty.
        self.readable = False
        #: The peer has shut down its sending side (EPOLLRDHUP): a short read is the last.
        self.rdhup = False
        #: The source's FIN was read.
        self.eof = False
        #: The FIN was passed on (shutdown of the destination's sending side).
        self.shut = False
        #: Bytes read and not yet taken by the destination.
        self.pending: memoryview | None = None
        self.moved = 0


class Relay:
    """One client connection and its backend connection."""

    __slots__ = (
        "attempt",
        "backend",
        "backend_fd",
        "client",
        "client_addr",
        "client_fd",
        "closed",
        "connected",
        "counters",
        "down",
        "early",
        "early_size",
        "service",
        "spliced",
        "up",
    )

    def __init__(self, service: TcpProxy, client: socket.socket, addr: tuple[str, int]) -> None:
        self.service = service
        self.client = client
        self.client_fd = client.fileno()
        self.client_addr = addr
        self.backend: socket.socket | None = None
        self.backend_fd = -1
        self.connected = False
        self.attempt = -1
        self.counters: EndpointCounters | None = None
        #: Client bytes that arrived before the backend connection was up.
        self.early: list[bytes] | None = None
        self.early_size = 0
        self.up = _Direction()  # client -> backend
        self.down = _Direction()  # backend -> client
        self.closed = False
        self.spliced: SpliceRelay | None = None

    @property
    def client_ip(self) -> str:
        return self.client_addr[0]

    # ---------------------------------------------------------------- events
    def on_events(self, fd: int, events: int) -> None:
        if self.closed:
            return
        if fd == self.client_fd:
            self._client_events(events)
        elif fd == self.backend_fd:
            if self.connected:
                self._backend_events(events)
            else:
                self._dial_events(events)

    def _client_events(self, events: int) -> None:
        up, down = self.up, self.down
        if events & EPOLLERR:
            self.reset()
            return
        if events & EPOLLRDHUP:
            up.rdhup = True
        if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP):
            up.readable = True
        if events & EPOLLOUT and down.pending is not None:
            self._flush(down, self.client)
            if self.closed:
                return
        if self.connected:
            self._pump(up, self.client, self.backend)  # type: ignore[arg-type]
            if not self.closed and down.readable and down.pending is None:
                self._pump(down, self.backend, self.client)  # type: ignore[arg-type]
        else:
            self._read_early()

    def _backend_events(self, events: int) -> None:
        up, down = self.up, self.down
        if events & EPOLLERR:
            self.reset()
            return
        if events & EPOLLRDHUP:
            down.rdhup = True
        if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP):
            down.readable = True
        if events & EPOLLOUT and up.pending is not None:
            self._flush(up, self.backend)  # type: ignore[arg-type]
            if self.closed:
                return
        self._pump(down, self.backend, self.client)  # type: ignore[arg-type]
        if not self.closed and up.readable and up.pending is None:
            self._pump(up, self.client, self.backend)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- moving bytes
    def _pump(self, d: _Direction, src: socket.socket, dst: socket.socket) -> None:
        """Read `src` and write `dst` until the source is empty or the destination is full."""
        counters = self.counters
        upstream = d is self.up
        for _ in range(READS_PER_TURN):
            if not d.readable or d.pending is not None or d.eof:
                return
            try:
                data = src.recv(CHUNK)
            except BlockingIOError:
                d.readable = False
                return
            except OSError:
                self.reset()
                return
            size = len(data)
            if not size:
                d.readable = False
                self._eof(d, dst)
                return
            if size < CHUNK:
                d.readable = False  # the queue is empty: the next arrival is a new edge
            if upstream:
                counters.bytes_from_clients += size  # type: ignore[union-attr]
            else:
                counters.bytes_to_clients += size  # type: ignore[union-attr]
            d.moved += size
            try:
                sent = dst.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.reset()
                return
            if sent < size:
                d.pending = memoryview(data)[sent:]
            if not d.readable and d.rdhup and d.pending is None:
                # EPOLLRDHUP and a short read: that was the last of it.
                self._eof(d, dst)
                return
            if d.moved >= SPLICE_AFTER and self._hand_to_splice():
                return
        if d.readable and d.pending is None:
            self.service.core.again(lambda: self._resume(d))

    def _resume(self, d: _Direction) -> None:
        if self.closed or self.spliced is not None:
            return
        if d is self.up:
            self._pump(d, self.client, self.backend)  # type: ignore[arg-type]
        else:
            self._pump(d, self.backend, self.client)  # type: ignore[arg-type]

    def _flush(self, d: _Direction, dst: socket.socket) -> None:
        pending = d.pending
        assert pending is not None
        try:
            sent = dst.send(pending)
        except BlockingIOError:
            return
        except OSError:
            self.reset()
            return
        if sent < len(pending):
            d.pending = pending[sent:]
            return
        d.pending = None
        if d.eof and not d.shut:
            self._shut(d, dst)

    def _eof(self, d: _Direction, dst: socket.socket | None) -> None:
        d.eof = True
        if dst is not None and d.pending is None:
            self._shut(d, dst)

    def _shut(self, d: _Direction, dst: socket.socket) -> None:
        """Pass the FIN on. When the other direction has ended already, closing both sockets
        sends it (every byte of both was read, so close sends FINs, not resets)."""
        d.shut = True
        other = self.down if d is self.up else self.up
        if other.shut:
            self.close()
            return
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            self.reset()

    # ---------------------------------------------------------------- dialling
    def dial(self) -> None:
        """Try the next endpoint (or give up after the last)."""
        service = self.service
        self.attempt += 1
        if self.attempt >= len(service.dial_timeouts):
            service._warn_unaccepted()
            self.reset()
            return
        try:
            endpoint = service.balancer.next_endpoint(
                service.name, self.client_ip, now=service.clock(), reset=self.attempt > 0
            )
        except BalancerError:
            service.stats.rejected += 1
            # At the next turn: a client on this loop may not have seen its connect complete
            # yet, and a reset before that fails its connect instead of its first read.
            service.core.again(self.reset)
            return
        self.counters = service.stats.endpoint(endpoint)
        try:
            sock = socket.socket(endpoint.family.socket_family, _NONBLOCKING_STREAM)
        except OSError as err:
            self._dial_failed(str(endpoint), err)
            return
        self.backend, self.backend_fd = sock, sock.fileno()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex((endpoint.ip, endpoint.port))
        except OSError as err:
            self._drop_backend()
            self._dial_failed(str(endpoint), err)
            return
        if code and code not in _IN_PROGRESS:
            self._drop_backend()
            self._dial_failed(str(endpoint), OSError(code, errno.errorcode.get(code, "")))
            return
        service.core.register(sock, self, CONNECTION_EVENTS)
        attempt = self.attempt
        timeout = service.dial_timeouts[attempt]
        service.core.call_at(service.loop.time() + timeout, lambda: self._dial_timeout(attempt))

    def _dial_events(self, events: int) -> None:
        if events & (EPOLLERR | EPOLLHUP):
            sock = self.backend
            code = 0
            if sock is not None:
                try:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                except OSError as err:
                    code = err.errno or 0
            self._drop_backend()
            self._dial_failed("", OSError(code, errno.errorcode.get(code, "refused")))
            return
        if events & EPOLLOUT:
            self._attach(events)

    def _dial_timeout(self, attempt: int) -> None:
        if self.closed or self.connected or attempt != self.attempt:
            return
        self._drop_backend()
        self._dial_failed("", TimeoutError())

    def _dial_failed(self, endpoint: str, err: BaseException) -> None:
        if self.counters is not None:
            self.counters.dial_failures += 1
        log.debug(
            "Dialling an endpoint failed; trying the next one.",
            service=str(self.service.name),
            endpoint=endpoint or None,
            attempt=self.attempt + 1,
            error=_describe(err),
        )
        self.counters = None
        if not self.closed:
            self.dial()

    def _drop_backend(self) -> None:
        if self.backend is not None:
            self.service.core.close_later(self.backend)
        self.backend, self.backend_fd = None, -1

    def _attach(self, events: int) -> None:
        """The backend connection is up: start relaying, starting with the early bytes."""
        self.connected = True
        counters = self.counters
        assert counters is not None and self.backend is not None
        counters.active += 1
        counters.total += 1
        service = self.service
        head: list[bytes] = []
        if service.proxy_protocol:
            head.append(self.proxy_header(service.proxy_protocol))
        if self.early:
            head += self.early
            counters.bytes_from_clients += self.early_size
            self.up.moved += self.early_size
            self.early, self.early_size = None, 0
        if head:
            data = b"".join(head)
            try:
                sent = self.backend.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.reset()
                return
            if sent < len(data):
                self.up.pending = memoryview(data)[sent:]
        if self.up.eof and self.up.pending is None:
            self._shut(self.up, self.backend)
            if self.closed:
                return
        self._backend_events(events & ~EPOLLOUT)
        if not self.closed and self.up.readable:
            self._pump(self.up, self.client, self.backend)

    def _read_early(self) -> None:
        """Hold what the client sends while its backend is being dialled, up to a bound."""
        up = self.up
        while up.readable and not up.eof and self.early_size < EARLY_DATA_LIMIT:
            wanted = EARLY_DATA_LIMIT - self.early_size
            try:
                data = self.client.recv(wanted)
            except BlockingIOError:
                up.readable = False
                return
            except OSError:
                self.reset()
                return
            if not data:
                up.readable = False
                up.eof = True
                return
            if len(data) < wanted:
                up.readable = False  # the queue is empty: the next arrival is a new edge
            if self.early is None:
                self.early = []
            self.early.append(data)
            self.early_size += len(data)

    # ---------------------------------------------------------------- ending
    def _hand_to_splice(self) -> bool:
        """Move a bulk relay to splice, if both directions are idle enough to let go."""
        up, down, service = self.up, self.down, self.service
        backend = self.backend
        if (
            backend is None
            or self.spliced is not None
            or up.pending is not None
            or down.pending is not None
            or up.eof
            or down.eof
            or not splice_supported()
            or SpliceRelay.active >= service.splice_budget
        ):
            return False
        counters = self.counters
        assert counters is not None

        def to_backend(size: int) -> None:
            counters.bytes_from_clients += size

        def to_client(size: int) -> None:
            counters.bytes_to_clients += size

        try:
            relay = SpliceRelay(
                service.loop,
                self.client,
                backend,
                to_backend=to_backend,
                to_client=to_client,
                on_closed=self._splice_closed,
            )
        except OSError:  # no descriptors for the pipes: stay here
            return False
        service.core.forget(self.client)
        service.core.forget(backend)
        self.spliced = relay
        relay.start()
        return True

    def _splice_closed(self) -> None:
        self.spliced = None
        self.closed = True
        self._account()

    def close(self) -> None:
        """Both directions finished: close both sockets."""
        if self.closed:
            return
        self.closed = True
        core = self.service.core
        core.close_later(self.client)
        if self.backend is not None:
            core.close_later(self.backend)
        self._account()

    def reset(self) -> None:
        """A side failed, no endpoint took the connection, or the relay is torn down: both
        peers see a reset."""
        if self.spliced is not None:
            self.spliced.reset()
            return
        if self.closed:
            return
        set_reset_on_close(self.client)
        if self.backend is not None:
            set_reset_on_close(self.backend)
        self.close()

    abort = reset

    def _account(self) -> None:
        service = self.service
        if self in service.connections:
            service.connections.discard(self)
            service.budget.in_use -= 1
            if self.connected and self.counters is not None:
                self.counters.active -= 1
        self.early = None

    def proxy_header(self, version: int) -> bytes:
        """The PROXY protocol header: this client, and the service address it dialled (the
        proxy port itself when no portal redirected it)."""
        dialled = original_destination(self.client)
        if dialled is None:
            dialled = self.client.getsockname()[:2]
        host, port = self.client_addr[0], self.client_addr[1]
        return proxyproto.header(version, (host, port), (dialled[0], dialled[1]))


class TcpProxy:
    """The listener of one TCP service port and the relays it accepted."""

    def __init__(
        self,
        *,
        name: ServicePortName,
        balancer: RoundRobinBalancer,
        stats: PortStats,
        connections: set[Relay],
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
        self.core: EventCore = eventcore.for_loop(self.loop)
        self._accepting = False
        #: The listening socket, once listening.
        self.sock: socket.socket | None = None

    def bind(
        self, *, host: str, port: int, family: Family = Family.IPv4, reuse_port: bool = False
    ) -> int:
        """Bind and listen; returns the bound port (the kernel's choice for port 0). From here
        the kernel queues connections in the backlog until `start()` accepts them."""
        sock = self.sock = listening_socket(host, port, family, reuse_port=reuse_port)
        return int(sock.getsockname()[1])

    async def start(self) -> None:
        """Accept on the bound socket."""
        assert self.sock is not None, "bind() first"
        self.core = eventcore.for_loop(self.loop)  # the last one closed when it fell idle
        try:
            self.core.register(self.sock, self, LISTENER_EVENTS)
        except BaseException:
            self.sock.close()
            self.sock = None
            raise
        self.core.acquire()
        self._accepting = True

    def on_events(self, fd: int, events: int) -> None:
        self._accept()

    def _accept(self) -> None:
        """Accept what the backlog holds, a bounded batch per turn."""
        sock = self.sock
        if sock is None or not self._accepting:
            return
        for _ in range(ACCEPTS_PER_TURN):
            try:
                conn, addr = sock.accept()
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: the connection stays queued; look again
                    # once relays have ended rather than spin.
                    self.core.call_at(self.loop.time() + 0.1, self._accept)
                    return
                continue  # the connection was gone before we took it (ECONNABORTED)
            self._serve(conn, addr)
        self.core.again(self._accept)

    def _serve(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        if not self.budget.take():
            self.shed(conn)
            return
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            self.budget.in_use -= 1
            conn.close()
            return
        relay = Relay(self, conn, addr)
        self.connections.add(relay)
        self.core.register(conn, relay, CONNECTION_EVENTS)
        relay.dial()

    def shed(self, conn: socket.socket) -> None:
        """Out of relay budget: reset the new connection at once, say so once a second."""
        set_reset_on_close(conn)
        self.core.close_later(conn)
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
        sock, self.sock = self.sock, None
        if sock is None:
            return
        if self._accepting:
            self._accepting = False
            self.core.close_later(sock)
            self.core.release()
        else:
            sock.close()  # bound but never started


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


def abort_all(connections: set[Relay]) -> None:
    for conn in list(connections):
        conn.abort()
