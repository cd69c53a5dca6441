"""Both address families: one provider per family behind one `Provider` (kube-proxy's
meta-proxier).

A dual-stack Service yields a service port per family with the same name; each family's
provider sees only its own service ports and endpoints, so nothing downstream (change tracking,
balancer, listeners, rules) has to tell the families apart. The primary family's provider
always exists; the other is made the first time a service port or endpoint of its family
arrives, so a single-stack node never touches the other family's tables. If that family cannot
be served here (a bind address of one family, a host without it), its service ports are listed
as failed with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import structlog

from userproxy.changes import ServiceKey
from userproxy.convert import EndpointsResult
from userproxy.model import Family, ServicePort
from userproxy.provider import Provider, ProxyStatus
from userproxy.settings import Settings

log = structlog.get_logger("userproxy")

#: Builds the provider of one family, or says why the family cannot be served.
Factory = Callable[[Family], Provider | str]


class DualStack:
    def __init__(self, primary: Provider, family: Family, factory: Factory) -> None:
        self.mode = primary.mode
        self.primary_family = family
        self._factory = factory
        self.children: dict[Family, Provider] = {family: primary}
        #: Why the other family is not served, once a try to build it failed.
        self.unavailable: dict[Family, str] = {}
        #: Service ports of an unavailable family, for the status.
        self._unserved: dict[ServiceKey, tuple[ServicePort, ...]] = {}
        self._started = False
        self._started_families: set[Family] = {family}
        self._request_sync: Callable[[], None] = lambda: None

    # ------------------------------------------------------------------ wiring
    @property
    def request_sync(self) -> Callable[[], None]:
        return self._request_sync

    @request_sync.setter
    def request_sync(self, value: Callable[[], None]) -> None:
        self._request_sync = value
        for child in self.children.values():
            child.request_sync = value

    def _child(self, family: Family) -> Provider | None:
        child = self.children.get(family)
        if child is not None or family in self.unavailable:
            return child
        made = self._factory(family)
        if isinstance(made, str):
            self.unavailable[family] = made
            log.error("Cannot serve this address family; its service ports are not served.",
                      family=family.value, reason=made)  # fmt: skip
            return None
        made.request_sync = self._request_sync
        self.children[family] = made
        log.info("Serving a second address family.", family=family.value)
        return made

    # ------------------------------------------------------------------ source handlers
    def on_service(self, key: ServiceKey, ports: tuple[ServicePort, ...] | None) -> None:
        for family in Family:
            mine = None if ports is None else tuple(p for p in ports if p.family is family)
            child = self.children.get(family) if not mine else self._child(family)
            if child is not None:
                child.on_service(key, mine)
            elif mine:
                self._unserved[key] = mine
            else:
                self._unserved.pop(key, None)

    def on_endpoints(self, result: EndpointsResult) -> None:
        for family in Family:
            ports = {
                key: tuple(i for i in infos if i.endpoint.family is family)
                for key, infos in result.ports.items()
            }
            has_any = any(ports.values())
            child = self._child(family) if has_any else self.children.get(family)
            if child is not None:
                child.on_endpoints(dataclasses.replace(result, ports=ports))

    def on_endpoints_deleted(self, service: ServiceKey, source: str) -> None:
        for child in self.children.values():
            child.on_endpoints_deleted(service, source)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._started = True
        for child in list(self.children.values()):
            await child.start()

    async def sync(self) -> None:
        for family, child in list(self.children.items()):
            if family not in self._started_families and self._started:
                self._started_families.add(family)  # made after start(): start it now
                await child.start()
            await child.sync()

    async def read_counters(self) -> None:
        for child in self.children.values():
            await child.read_counters()

    def status(self) -> ProxyStatus:
        parts = [child.status() for child in self.children.values()]
        failed = [f for part in parts for f in part.failed]
        for family, reason in self.unavailable.items():
            failed += [
                (port.name, f"{family.value} is not served here: {reason}")
                for ports in self._unserved.values()
                for port in ports
            ]
        return ProxyStatus(
            mode=self.mode,
            service_ports=tuple(sp for part in parts for sp in part.service_ports),
            failed=tuple(failed),
            pending_service_changes=sum(part.pending_service_changes for part in parts),
            failures=_summed(f for part in parts for f in part.failures),
        )

    async def close(self, *, keep_rules: bool = False) -> None:
        for child in self.children.values():
            await child.close(keep_rules=keep_rules)

    # ------------------------------------------------------------------ hand-over
    def listener_ports(self) -> dict[str, int]:
        return {k: v for child in self.children.values() for k, v in child.listener_ports().items()}

    def handover_fds(self) -> list[tuple[str, int]]:
        return [fd for child in self.children.values() for fd in child.handover_fds()]

    def stop_accepting(self) -> None:
        for child in self.children.values():
            child.stop_accepting()

    async def drain(self, timeout: float) -> int:
        left = await asyncio.gather(*(c.drain(timeout) for c in self.children.values()))
        return sum(left)

    # ------------------------------------------------------------------ embedding
    def __getattr__(self, name: str) -> Any:
        """What only the primary family's provider offers (a proxier's `balancer`, ...)."""
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.children[self.primary_family], name)


def settings_for(settings: Settings, family: Family) -> Settings | str:
    """The settings of one family's proxier, or why the family cannot be served: the bind
    address's counterpart in the other family (0.0.0.0 and ::, 127.0.0.1 and ::1)."""
    if settings.bind_family is family:
        return settings
    address = ipaddress.ip_address(settings.bind_address)
    if address.is_unspecified:
        other = "::" if family is Family.IPv6 else "0.0.0.0"
    elif address.is_loopback:
        other = "::1" if family is Family.IPv6 else "127.0.0.1"
    else:
        return f"--bind-address {settings.bind_address} is an {settings.bind_family} address"
    if family is Family.IPv6 and not Path("/proc/net/if_inet6").exists():
        return "this host has IPv6 disabled"
    return dataclasses.replace(settings, bind_address=other)


def _summed(counts: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """Per-name counters of both families, added up."""
    total: dict[str, int] = {}
    for name, count in counts:
        total[name] = total.get(name, 0) + count
    return tuple(total.items())
