"""The service health check: for every Service with `spec.healthCheckNodePort` (LoadBalancer
Services with `externalTrafficPolicy: Local`), an HTTP server on that port that tells the cloud
load balancer whether this node has ready endpoints of the Service, as kube-proxy's does:

    200 {"service": {"namespace", "name"}, "localEndpoints": N, "serviceProxyHealthy": true}

when N > 0 and the proxy is healthy, 503 with the same body otherwise (any path, any method).
Servers open and close as Services come and go (after every sync); a port another process holds
is an error for that Service only. They listen on every node address (IPv4 and IPv6), or on the
node addresses within `--nodeport-addresses`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from userproxy.handover.adoption import Adoption
from userproxy.model import Family
from userproxy.provider import ProxyStatus
from userproxy.userspace.tcp import listening_socket

log = structlog.get_logger("userproxy.servicehealth")

#: Request bytes read before answering (the request itself does not matter).
MAX_REQUEST = 8192


@dataclass(frozen=True)
class ServiceHealth:
    namespace: str
    name: str
    local_endpoints: int


def wanted(status: ProxyStatus) -> dict[int, ServiceHealth]:
    """Health-check port -> the Service it reports, local endpoints summed over its ports and
    families (each service port reports the same Service)."""
    out: dict[int, ServiceHealth] = {}
    counts: dict[tuple[int, str, str], int] = {}
    for sp in status.service_ports:
        port = sp.port.health_check_node_port
        if not port:
            continue
        key = (port, sp.name.namespace, sp.name.name)
        counts[key] = max(counts.get(key, 0), sp.local_endpoints)
    for (port, namespace, name), count in sorted(counts.items()):
        out.setdefault(port, ServiceHealth(namespace, name, count))
    return out


def answer(health: ServiceHealth, proxy_healthy: bool) -> bytes:
    ok = health.local_endpoints > 0 and proxy_healthy
    body = json.dumps(
        {
            "service": {"namespace": health.namespace, "name": health.name},
            "localEndpoints": health.local_endpoints,
            "serviceProxyHealthy": proxy_healthy,
        }
    ).encode()
    status = b"200 OK" if ok else b"503 Service Unavailable"
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
        b"X-Content-Type-Options: nosniff\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


class _Responder(asyncio.Protocol):
    def __init__(self, reply: Callable[[], bytes]) -> None:
        self.reply = reply
        self.received = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if b"\r\n\r\n" in data or self.received >= MAX_REQUEST:
            assert self.transport is not None
            self.transport.write(self.reply())
            self.transport.close()


class ServiceHealthServers:
    def __init__(
        self,
        *,
        proxy_healthy: Callable[[], bool],
        addresses: Callable[[], Iterable[str]] = lambda: ("0.0.0.0", "::"),
        adoption: Adoption | None = None,
    ) -> None:
        self.proxy_healthy = proxy_healthy
        self.addresses = addresses
        #: A predecessor's health-check sockets (a hand-over), taken as ports open.
        self.adoption = adoption
        self._fds: dict[str, int] = {}
        self.services: dict[int, ServiceHealth] = {}
        self._servers: dict[int, list[asyncio.AbstractServer]] = {}
        self._failed: dict[int, str] = {}
        self._lock = asyncio.Lock()

    def reply(self, port: int) -> bytes:
        health = self.services.get(port)
        if health is None:
            return answer(ServiceHealth("", "", 0), False)
        return answer(health, self.proxy_healthy())

    async def update(self, status: ProxyStatus) -> None:
        """Open and close servers to match the Services with a health-check port."""
        async with self._lock:
            desired = wanted(status)
            self.services = desired
            for port in [p for p in self._servers if p not in desired]:
                await self._close(port)
            for port, health in desired.items():
                if port not in self._servers:
                    await self._open(port, health)

    async def _open(self, port: int, health: ServiceHealth) -> None:
        loop = asyncio.get_running_loop()
        servers: list[asyncio.AbstractServer] = []
        errors = []
        for address in self.addresses():
            key = f"health/{port}/{address}"
            sock = self.adoption.take(key) if self.adoption is not None else None
            try:
                sock = sock or listening_socket(address, port, Family.of(address))
            except OSError as err:
                errors.append(f"{address}: {err.strerror or err}")
                continue
            self._fds[key] = sock.fileno()
            server = await loop.create_server(
                lambda: _Responder(lambda: self.reply(port)), sock=sock
            )
            servers.append(server)
        if errors and not servers:
            reason = "; ".join(errors)
            if self._failed.get(port) != reason:
                log.error("Cannot open the Service's health-check port; its other traffic is "
                          "served.", service=f"{health.namespace}/{health.name}", port=port,
                          reason=reason)  # fmt: skip
            self._failed[port] = reason
            return
        self._failed.pop(port, None)
        self._servers[port] = servers
        log.info("Serving the Service's health check.",
                 service=f"{health.namespace}/{health.name}", port=port)  # fmt: skip

    def handover_fds(self) -> list[tuple[str, int]]:
        return list(self._fds.items())

    async def _close(self, port: int) -> None:
        for key in [k for k in self._fds if k.startswith(f"health/{port}/")]:
            del self._fds[key]
        for server in self._servers.pop(port, []):
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()

    def errors(self) -> dict[int, str]:
        return dict(self._failed)

    async def close(self) -> None:
        async with self._lock:
            for port in list(self._servers):
                await self._close(port)
            self._failed.clear()
