"""The UDP data path: one socket per service port, one flow per client address.

Every socket here is registered once, edge-triggered, in the process's own event core
(`eventcore`, shared with the TCP relays): a handler reads until the kernel says EAGAIN, or
hands the rest of a long burst to the next turn; flows idle out through the core's one
deadline heap, not a timer each.

A flow is a connected socket from the node to the endpoint its first datagram was given.
Datagrams from the client go out on it; replies come back on it and leave through the
*service* socket, so the kernel's NAT (REDIRECT/DNAT) maps their source back to the address
the client sent to. A flow idles out after `--udp-timeout` without traffic in either
direction; the next datagram then picks an endpoint afresh.

Network facts this code depends on:
- Datagrams are read with a 64 KiB buffer and checked for MSG_TRUNC, so anything up to the
  IPv4 maximum of 65,507 bytes passes intact (the old proxy truncated at 4 KiB).
- The reply's source address is pinned with IP_PKTINFO to the address the client's datagram
  was received on (after NAT). Without it a wildcard-bound socket lets the route decide, and
  for a client on the node talking to 127.0.0.1:nodePort the reply leaves from 127.0.0.1
  while conntrack expects the node IP, so the client never sees it.
- ICMP port-unreachable from a dead endpoint surfaces as ECONNREFUSED on the flow's
  connected socket; the flow is then dropped so the next datagram can go elsewhere.
- On a wildcard-bound service socket, a flow also gets a client socket: bound to the address
  its first datagram was received on (the same proxy port, SO_REUSEADDR) and connected to
  the client. The kernel looks up sockets bound to the datagram's own address before
  wildcard ones, and a connected socket matches the client exactly, so the rest of the
  flow's datagrams arrive there: read with a plain `recv_into` (no address, no ancillary
  data, no flow lookup), and replies leave through it from the right source without
  IP_PKTINFO. Datagrams already queued on the service socket still reach the flow.
- Between its bind and its connect, a client socket is the best match for *every* client of
  that address and port, so other clients' datagrams can be queued on it; connecting does
  not remove them. Until its queue has once been empty, a client socket is read with
  `recvfrom_into` and each datagram goes to the flow of its real sender, so no datagram is
  ever relayed for, or answered to, the wrong client.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

import structlog

from userproxy.balancer import BalancerError, RoundRobinBalancer
from userproxy.model import Endpoint, Family, ServicePortName
from userproxy.userspace import eventcore
from userproxy.userspace.eventcore import EPOLLET, EPOLLIN, EventCore
from userproxy.userspace.stats import EndpointCounters, PortStats
from userproxy.userspace.tcp import RelayBudget

log = structlog.get_logger("userproxy.udp")

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
MAX_DATAGRAM = 65535
#: struct in_pktinfo (ifindex, spec_dst, addr) and struct in6_pktinfo (addr, ifindex).
_PKTINFO = struct.Struct("I4s4s")
_PKTINFO6 = struct.Struct("16sI")
_ANCILLARY_SPACE = socket.CMSG_SPACE(max(_PKTINFO.size, _PKTINFO6.size))
WILDCARDS = ("0.0.0.0", "::", "")


def _pktinfo_cmsg(local: bytes) -> tuple[int, int, bytes]:
    """The ancillary item that pins a reply's source to `local` (4 or 16 bytes); read back
    by `_local_of` as the address a datagram was received on."""
    if len(local) == 16:
        return (socket.IPPROTO_IPV6, IPV6_PKTINFO, _PKTINFO6.pack(local, 0))
    return (socket.SOL_IP, IP_PKTINFO, _PKTINFO.pack(0, local, local))


def _local_of(level: int, kind: int, data: bytes) -> bytes | None:
    if level == socket.SOL_IP and kind == IP_PKTINFO:
        return bytes(_PKTINFO.unpack_from(data)[2])
    if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO:
        return bytes(_PKTINFO6.unpack_from(data)[0])
    return None


#: Datagrams handled per readiness callback before yielding to other sockets.
READ_BATCH = 128
#: Receive buffer of a service socket: room for bursts of ~10k small datagrams while the
#: loop is busy elsewhere (the 208 KiB default holds a few hundred).
SERVICE_RCVBUF = 4 << 20
DIAL_ATTEMPTS = 4
#: What a UDP socket is registered for: datagrams to read, edge-triggered.
DATAGRAM_EVENTS = EPOLLIN | EPOLLET

Address = tuple[str, int]
Clock = Callable[[], float]


class _Flow:
    __slots__ = (
        "client",
        "client_sock",
        "counters",
        "endpoint",
        "last_active",
        "local",
        "proxy",
        "reply_cmsg",
        "sock",
        "sock_fd",
        "strays_possible",
    )

    def __init__(
        self,
        *,
        proxy: UdpProxy,
        client: Address,
        sock: socket.socket,
        endpoint: Endpoint,
        counters: EndpointCounters,
        reply_cmsg: list[tuple[int, int, bytes]],
        now: float,
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.sock = sock
        self.sock_fd = sock.fileno()
        self.endpoint = endpoint
        self.counters = counters
        self.reply_cmsg = reply_cmsg
        self.last_active = now
        #: Connected to the client, on the service port (see the module doc), if made.
        self.client_sock: socket.socket | None = None
        #: The packed address the first datagram was received on (IPv4 wildcard sockets).
        self.local: bytes | None = None
        #: The client socket may still hold other clients' datagrams (see the module doc).
        self.strays_possible = False

    def on_events(self, fd: int, events: int) -> None:
        """Replies on the flow's socket, or the client's datagrams on its client socket."""
        if fd == self.sock_fd:
            self.proxy._on_replies(self)
        else:
            self.proxy._on_client_datagrams(self)


class UdpProxy:
    def __init__(
        self,
        *,
        name: ServicePortName,
        balancer: RoundRobinBalancer,
        stats: PortStats,
        clock: Clock,
        idle_timeout: float,
        budget: RelayBudget | None = None,
    ) -> None:
        if idle_timeout <= 0:
            raise ValueError("the UDP idle timeout must be greater than zero")
        self.name = name
        #: Shared with the TCP relays: a flow holds two descriptors, as a relay does.
        self.budget = budget or RelayBudget()
        self.balancer = balancer
        self.stats = stats
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.loop = asyncio.get_running_loop()
        self.core: EventCore = eventcore.for_loop(self.loop)
        self._using_core = False
        self.flows: dict[Address, _Flow] = {}
        self._sock: socket.socket | None = None
        self._pktinfo = False
        self._port = 0
        self._reading = False
        # One receive buffer per service socket, reused for every datagram: reading into a
        # fresh 64 KiB bytes object per datagram costs more than the rest of the path.
        self._buffer = bytearray(MAX_DATAGRAM)
        self._view = memoryview(self._buffer)
        self._buffers = [self._buffer]
        self._reply_buffer = bytearray(MAX_DATAGRAM)
        self._reply_view = memoryview(self._reply_buffer)

    # ---------------------------------------------------------------- lifecycle
    def bind(
        self, *, host: str, port: int, family: Family = Family.IPv4, reuse_port: bool = False
    ) -> int:
        """Bind the service socket; the kernel queues datagrams until `start()` reads them."""
        sock = socket.socket(family.socket_family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # Only a wildcard-bound socket can pick the wrong reply source (see module doc).
            self._pktinfo = host in WILDCARDS
            if family is Family.IPv6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if self._pktinfo:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            elif self._pktinfo:
                sock.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
            _grow_receive_buffer(sock, SERVICE_RCVBUF)
            sock.bind((host, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._port = int(sock.getsockname()[1])
        return self._port

    def adopt(self, sock: socket.socket) -> int:
        """Take over a service socket a predecessor handed over (its options set, datagrams
        queued). Returns its port."""
        sock.setblocking(False)
        host, port = sock.getsockname()[:2]
        self._pktinfo = host in WILDCARDS
        self._sock = sock
        self._port = int(port)
        return self._port

    @property
    def active(self) -> int:
        """Flows still open."""
        return len(self.flows)

    def stop_accepting(self, *, keep_socket: bool = True) -> None:
        """A successor reads the service port now: new clients go to it; this process's flows
        run until they idle out. `keep_socket`: the successor reads this very socket, which
        stays open here for the replies of flows without a client socket of their own;
        otherwise (a worker's socket in an SO_REUSEPORT group) it is closed so the kernel
        stops choosing it, and such flows end."""
        if self._sock is None:
            return
        if self._reading:
            self.core.forget(self._sock)
            self._reading = False
        if not keep_socket:
            for flow in [f for f in self.flows.values() if f.client_sock is None]:
                self._close_flow(flow)
            self._sock.close()
            self._sock = None
        self._release_core()

    async def start(self) -> None:
        """Read datagrams from the bound socket."""
        assert self._sock is not None, "bind() first"
        self.core = eventcore.for_loop(self.loop)  # the last one closed when it fell idle
        self.core.register(self._sock, self, DATAGRAM_EVENTS)
        self.core.acquire()
        self._using_core = self._reading = True

    def _release_core(self) -> None:
        if self._using_core:
            self._using_core = False
            self.core.release()

    def on_events(self, fd: int, events: int) -> None:
        self._on_datagrams()

    @property
    def sock(self) -> socket.socket | None:
        return self._sock

    def close_listener(self) -> None:
        """Close the service socket and every flow (their replies could not leave anyway)."""
        for flow in list(self.flows.values()):
            self._close_flow(flow)
        if self._sock is not None:
            if self._reading:
                self.core.forget(self._sock)
            self._sock.close()
            self._sock = None
            self._reading = False
        self._release_core()

    # ---------------------------------------------------------------- client -> endpoint
    def _on_datagrams(self) -> None:
        sock = self._sock
        if sock is None:
            return
        buffers, flows, now = self._buffers, self.flows, self.loop.time()
        for _ in range(READ_BATCH):
            try:
                size, ancillary, flags, client = sock.recvmsg_into(buffers, _ANCILLARY_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                log.debug(
                    "Reading from a UDP service socket failed.",
                    service=str(self.name),
                    error=str(err),
                )
                return
            if flags & socket.MSG_TRUNC:
                continue
            flow = flows.get(client)
            if flow is None:
                self._relay_new(client, size, ancillary, now)
                continue
            flow.last_active = now
            self._to_endpoint(flow, size)
        self.core.again(self._on_datagrams)  # a long burst: the rest at the next turn

    def _relay_new(
        self, client: Address, size: int, ancillary: list[tuple[int, int, bytes]], now: float
    ) -> None:
        """A new client's first datagram: open its flow, relay, then give it a client socket."""
        flow = self._open_flow(client, ancillary)
        if flow is not None and self._to_endpoint(flow, size) and flow.local is not None:
            self._attach_client_socket(flow, flow.local)

    def _open_flow(self, client: Address, ancillary: list[tuple[int, int, bytes]]) -> _Flow | None:
        if not self.budget.take():  # out of descriptors for another flow: drop the datagram,
            return None  # as a full network would (counted in the budget's `shed`)
        flow = self._dial_flow(client, ancillary)
        if flow is None:
            self.budget.in_use -= 1
        return flow

    def _dial_flow(self, client: Address, ancillary: list[tuple[int, int, bytes]]) -> _Flow | None:
        for attempt in range(DIAL_ATTEMPTS):
            try:
                endpoint = self.balancer.next_endpoint(
                    self.name, client[0], now=self.clock(), reset=attempt > 0
                )
            except BalancerError:
                self.stats.rejected += 1
                return None
            counters = self.stats.endpoint(endpoint)
            try:
                sock = _connected_socket(endpoint)
            except OSError:
                counters.dial_failures += 1
                continue
            return self._start_flow(client, sock, endpoint, counters, ancillary)
        return None

    def _start_flow(
        self,
        client: Address,
        sock: socket.socket,
        endpoint: Endpoint,
        counters: EndpointCounters,
        ancillary: list[tuple[int, int, bytes]],
    ) -> _Flow:
        flow = _Flow(
            proxy=self,
            client=client,
            sock=sock,
            endpoint=endpoint,
            counters=counters,
            reply_cmsg=self._reply_cmsg(ancillary),
            now=self.loop.time(),
        )
        self.flows[client] = flow
        counters.active += 1
        counters.total += 1
        self.core.register(sock, flow, DATAGRAM_EVENTS)
        self._expire_at(flow, self.loop.time() + self.idle_timeout)
        flow.local = self._received_on(ancillary)
        return flow

    def _attach_client_socket(self, flow: _Flow, local: bytes) -> None:
        """Once the flow's first datagram is on its way: the flow's client socket."""
        flow.local = None  # attempted once
        flow.client_sock = self._client_socket(local, flow.client)
        if flow.client_sock is not None:
            flow.strays_possible = True
            self.core.register(flow.client_sock, flow, DATAGRAM_EVENTS)

    def _received_on(self, ancillary: list[tuple[int, int, bytes]]) -> bytes | None:
        """The (post-NAT) address a datagram was delivered to, from its IP(V6)_PKTINFO."""
        if not self._pktinfo:
            return None
        for level, kind, data in ancillary:
            local = _local_of(level, kind, data)
            if local is not None:
                return local
        return None

    def _reply_cmsg(self, ancillary: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
        local = self._received_on(ancillary)
        return [] if local is None else [_pktinfo_cmsg(local)]

    def _client_socket(self, local: bytes, client: Address) -> socket.socket | None:
        family = socket.AF_INET6 if len(local) == 16 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            _grow_receive_buffer(sock, SERVICE_RCVBUF)  # it takes over the flow's bursts
            sock.setblocking(False)
            sock.bind((socket.inet_ntop(family, local), self._port))
            sock.connect(client)
        except OSError as err:  # the flow still works through the service socket
            sock.close()
            log.debug("No client socket for a UDP flow.", service=str(self.name), error=str(err))
            return None
        return sock

    def _on_client_datagrams(self, flow: _Flow) -> None:
        client_sock = flow.client_sock
        if client_sock is None:
            return
        if flow.strays_possible:
            self._sort_strays(flow, client_sock)
            return
        buffer = self._buffer
        flow.last_active = self.loop.time()
        for _ in range(READ_BATCH):
            try:
                # 64 KiB holds any IPv4 datagram: no truncation to check for.
                size = client_sock.recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ECONNREFUSED: the client's port is gone
                self._close_flow(flow)
                return
            if not self._to_endpoint(flow, size):
                return
        self.core.again(lambda: self._on_client_datagrams(flow))

    def _sort_strays(self, flow: _Flow, client_sock: socket.socket) -> None:
        """Read with the sender's address, relaying each datagram on its sender's flow, until
        the queue is empty once: from then on only the flow's client can be in it."""
        now = self.loop.time()
        local = socket.inet_pton(client_sock.family, client_sock.getsockname()[0])
        received_on = [_pktinfo_cmsg(local)]
        for _ in range(READ_BATCH):
            try:
                size, sender = client_sock.recvfrom_into(self._buffer)
            except (BlockingIOError, InterruptedError):
                flow.strays_possible = False
                return
            except OSError:
                self._close_flow(flow)
                return
            owner = self.flows.get(sender)
            if owner is None:
                self._relay_new(sender, size, received_on, now)
            else:
                owner.last_active = now
                self._to_endpoint(owner, size)
            if flow.client_sock is None:  # this flow closed while relaying
                return
        self.core.again(lambda: self._on_client_datagrams(flow))

    def _to_endpoint(self, flow: _Flow, size: int) -> bool:
        """Send the read buffer's first `size` bytes on the flow; False if the flow is gone."""
        try:
            flow.sock.send(self._view[:size])
        except (BlockingIOError, InterruptedError):
            return True  # the socket buffer is full: drop, as the network would
        except OSError:
            # An earlier datagram drew ICMP unreachable: the endpoint is gone.
            self._close_flow(flow)
            return False
        flow.counters.bytes_from_clients += size
        return True

    # ---------------------------------------------------------------- endpoint -> client
    def _on_replies(self, flow: _Flow) -> None:
        if self.flows.get(flow.client) is not flow:
            return  # closed earlier in this batch
        service_sock = self._sock
        buffer, view = self._reply_buffer, self._reply_view
        flow.last_active = self.loop.time()
        for _ in range(READ_BATCH):
            try:
                size = flow.sock.recv_into(buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close_flow(flow)
                return
            try:
                if flow.client_sock is not None:
                    flow.client_sock.send(view[:size])
                elif service_sock is not None:
                    service_sock.sendmsg([view[:size]], flow.reply_cmsg, 0, flow.client)
                else:
                    return
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as err:
                log.debug("A UDP reply could not be sent.", service=str(self.name), error=str(err))
                continue
            flow.counters.bytes_to_clients += size
        self.core.again(lambda: self._on_replies(flow))

    # ---------------------------------------------------------------- idle expiry
    def _expire_at(self, flow: _Flow, when: float) -> None:
        self.core.call_at(when, lambda: self._check_idle(flow))

    def _check_idle(self, flow: _Flow) -> None:
        if self.flows.get(flow.client) is not flow:
            return  # closed already
        idle = self.loop.time() - flow.last_active
        if idle >= self.idle_timeout:
            self._close_flow(flow)
        else:
            self._expire_at(flow, flow.last_active + self.idle_timeout)

    def _close_flow(self, flow: _Flow) -> None:
        if self.flows.get(flow.client) is not flow:
            return
        del self.flows[flow.client]
        self.budget.in_use -= 1
        self.core.close_later(flow.sock)
        if flow.client_sock is not None:
            self.core.close_later(flow.client_sock)
            flow.client_sock = None
        flow.counters.active -= 1


def _grow_receive_buffer(sock: socket.socket, size: int) -> None:
    """SO_RCVBUFFORCE passes net.core.rmem_max with CAP_NET_ADMIN (a node proxy has it);
    without, SO_RCVBUF gets what the sysctl allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def _connected_socket(endpoint: Endpoint) -> socket.socket:
    sock = socket.socket(endpoint.family.socket_family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.connect((endpoint.ip, endpoint.port))
    except OSError:
        sock.close()
        raise
    return sock
