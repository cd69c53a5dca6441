"""Change tracking between syncs. Pure.

Service changes are recorded per Service and collapsed: however many events arrive between two
syncs, the sync sees one (previous, current) pair per Service, and none when the Service ended
up as it was. Endpoint changes are not batched; the cache here only answers "which endpoints
does this service port have now", merging every EndpointSlice of the Service.
"""

from __future__ import annotations

from collections.abc import Iterable

from userproxy.convert import EndpointsResult, PortEndpoints
from userproxy.model import (
    Endpoint,
    EndpointInfo,
    Protocol,
    ServicePort,
    ServicePortName,
    Topology,
    usable_endpoints,
)

ServiceKey = tuple[str, str]
Ports = tuple[ServicePort, ...]
Change = tuple[Ports | None, Ports | None]


class ServiceChangeTracker:
    def __init__(self) -> None:
        self._applied: dict[ServiceKey, Ports] = {}
        self._pending: dict[ServiceKey, Ports | None] = {}

    def record(self, key: ServiceKey, current: Ports | None) -> None:
        """Note the Service's latest state; None means deleted (or not served)."""
        self._pending[key] = current

    def take(self) -> dict[ServiceKey, Change]:
        """The net changes since the last take, as (previous, current) per Service."""
        changes: dict[ServiceKey, Change] = {}
        for key, current in self._pending.items():
            previous = self._applied.get(key)
            if previous == current:
                continue
            changes[key] = (previous, current)
            if current is None:
                self._applied.pop(key, None)
            else:
                self._applied[key] = current
        self._pending.clear()
        return changes

    def applied(self, key: ServiceKey) -> Ports:
        """The Service's ports as of the last take (what the proxier serves)."""
        return self._applied.get(key, ())

    @property
    def pending(self) -> int:
        """How many Services have a change waiting for the next sync."""
        return sum(1 for k, v in self._pending.items() if self._applied.get(k) != v)


class EndpointsCache:
    """Endpoints per Service, merged from every source object (EndpointSlice) naming it."""

    def __init__(self) -> None:
        self._by_service: dict[ServiceKey, dict[str, PortEndpoints]] = {}
        #: port_names() per service, made once per change (a 10,000-service sync asks twice).
        self._names: dict[ServiceKey, frozenset[ServicePortName]] = {}

    def update(self, result: EndpointsResult) -> None:
        sources = self._by_service.setdefault(result.service, {})
        sources[result.source] = result.ports
        self._names.pop(result.service, None)

    def delete(self, service: ServiceKey, source: str) -> None:
        sources = self._by_service.get(service)
        if sources is not None:
            sources.pop(source, None)
            self._names.pop(service, None)
            if not sources:
                del self._by_service[service]

    def port_names(self, service: ServiceKey) -> frozenset[ServicePortName]:
        names = self._names.get(service)
        if names is None:
            names = self._names[service] = frozenset(
                ServicePortName(service[0], service[1], port, protocol)
                for ports in self._by_service.get(service, {}).values()
                for port, protocol in ports
            )
        return names

    def infos(self, name: ServicePortName) -> list[EndpointInfo]:
        key: tuple[str, Protocol] = (name.port, name.protocol)
        return [
            info
            for ports in self._by_service.get(name.service, {}).values()
            for info in ports.get(key, ())
        ]

    def endpoints(
        self,
        name: ServicePortName,
        *,
        local_node: str | None = None,
        topology: Topology | None = None,
    ) -> list[Endpoint]:
        return usable_endpoints(self.infos(name), local_node=local_node, topology=topology)


def names_of(ports: Iterable[ServicePort] | None) -> dict[ServicePortName, ServicePort]:
    return {p.name: p for p in ports or ()}
