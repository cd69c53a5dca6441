"""UDP flows are isolated: in a burst of thousands of new flows from distinct source ports, on
a wildcard-bound service socket (where flows get client sockets), every reply goes back to the
client that sent the datagram, and no datagram is relayed for another client."""

from __future__ import annotations

import asyncio
import selectors
import socket
import time

from tests.helpers import LOCAL, udp_echo, wait_for
from userproxy import ProxySettings, UserProxy
from userproxy.objects import endpoint_slice, service

FLOWS = 5000
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
NAME = "default/dns:dns"


def burst(port: int, count: int, deadline: float) -> tuple[int, int]:
    """Send one datagram from each of `count` new client sockets, all at once, then read the
    replies. Returns (replies that came back to their sender, replies that went elsewhere)."""
    clients = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            clients.append(sock)
            sock.bind((LOCAL, 0))
            sock.setblocking(False)
        selector = selectors.DefaultSelector()
        tokens = {}
        for sock in clients:
            token = f"from {sock.getsockname()[1]}".encode()
            tokens[sock] = token
            sock.sendto(token, (LOCAL, port))
            selector.register(sock, selectors.EVENT_READ)
        right = wrong = 0
        waiting = len(clients)
        # Read until every client has its reply (or the deadline), then a little longer:
        # a datagram a client did not ask for may come after its own reply.
        grace_end = deadline
        while time.monotonic() < min(deadline, grace_end):
            for key, _ in selector.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                while True:
                    try:
                        reply = sock.recv(2048)
                    except BlockingIOError:
                        break
                    if reply == tokens.pop(sock, None):
                        right += 1
                        waiting -= 1
                    else:
                        wrong += 1
            if waiting == 0 and grace_end == deadline:
                grace_end = time.monotonic() + 0.5
        selector.close()
        return right, wrong
    finally:
        for sock in clients:
            sock.close()


async def test_a_burst_of_new_flows_never_crosses_clients() -> None:
    echo, backend_port = await udp_echo()
    # Room for the whole burst at the backend, so the count below measures the proxy.
    echo.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    # Bound to every address, as on a node (flows get client sockets); traffic is loopback.
    settings = ProxySettings(bind_address="0.0.0.0", min_sync_period=0.0, udp_idle_timeout=30)
    try:
        async with UserProxy(settings) as proxy:
            await proxy.apply(
                service("dns", cluster_ip="10.96.0.53", ports=[("dns", 53, "UDP")]),
                endpoint_slice("dns", addresses=[LOCAL], ports=[("dns", backend_port, "UDP")]),
            )
            port = proxy.proxy_port(NAME)
            deadline = time.monotonic() + 30
            right, wrong = await asyncio.to_thread(burst, port, FLOWS, deadline)
            assert wrong == 0, f"{wrong} replies reached a client that did not send them"
            # UDP may drop under a burst; most must arrive for the check to mean anything.
            assert right >= FLOWS * 0.9, f"only {right} of {FLOWS} replies arrived"
            assert proxy.counters(NAME).total >= right
    finally:
        echo.close()


async def test_udp_flows_beyond_the_descriptor_budget_are_dropped_not_fatal() -> None:
    from userproxy.userspace.proxier import Proxier
    from userproxy.userspace.tcp import RelayBudget

    echo, backend_port = await udp_echo()
    budget = RelayBudget(descriptors=RelayBudget.HEADROOM + 2 + 2 * 10)  # one listener, 10 flows
    settings = ProxySettings(bind_address="127.0.0.1", allow_loopback_bind=True,
                             min_sync_period=0.0, udp_idle_timeout=0.3)  # fmt: skip
    proxy = UserProxy(settings, provider=Proxier(settings=settings, relay_budget=budget))
    try:
        async with proxy:
            await proxy.apply(
                service("dns", cluster_ip="10.96.0.53", ports=[("dns", 53, "UDP")]),
                endpoint_slice("dns", addresses=[LOCAL], ports=[("dns", backend_port, "UDP")]),
            )
            port = proxy.proxy_port(NAME)
            right, wrong = await asyncio.to_thread(burst, port, 20, time.monotonic() + 2)
            assert (right, wrong) == (10, 0)
            assert budget.shed >= 10
            # The flows idle out and give their descriptors back.
            await wait_for(lambda: budget.in_use == 0, 3, "the flows to idle out")
            right, _ = await asyncio.to_thread(burst, port, 5, time.monotonic() + 2)
            assert right == 5
    finally:
        echo.close()
