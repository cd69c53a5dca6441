"""`UserProxy`: one proxy instance on the caller's event loop. The CLI runs exactly this.

    async with UserProxy(ProxySettings(bind_address="127.0.0.1", allow_loopback_bind=True)) as p:
        await p.apply(service(...), endpoint_slice(...))
        port = p.proxy_port("default/web:http")

Objects are plain Kubernetes dicts (or YAML text). `apply` and `delete` sync at once, so the
proxy ports are ready when they return; sources that stream changes (files, the API) go through
the bounded-frequency runner instead.

It wires one `Provider` (the userspace proxier unless another is given) to the object router
and the sync runner, and reads everything it reports from the provider's `status()`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import structlog
import yaml

from userproxy import tasks
from userproxy.dualstack import DualStack, settings_for
from userproxy.externalips import ExternalIPPolicy
from userproxy.localaddrs import local_addresses
from userproxy.model import Family, ServicePortName
from userproxy.provider import (
    CountersSnapshot,
    Provider,
    ProxyStatus,
    RefusedObject,
    ServicePortStatus,
)
from userproxy.runner import SyncRunner
from userproxy.settings import Settings
from userproxy.sources.router import ObjectRouter, object_key
from userproxy.userspace.portals.interface import Portals
from userproxy.userspace.proxier import Proxier

log = structlog.get_logger("userproxy")


class UnknownServicePort(KeyError):
    pass


def _userspace(settings: Settings, portals: Portals | None) -> DualStack:
    """The userspace proxier of the bind address's family (with `portals`), and one for the
    other family when a dual-stack or IPv6 Service arrives (proxy ports only)."""

    def other(family: Family) -> Proxier | str:
        family_settings = settings_for(settings, family)
        return (
            family_settings
            if isinstance(family_settings, str)
            else Proxier(settings=family_settings)
        )

    primary = Proxier(settings=settings, portals=portals)
    return DualStack(primary, settings.bind_family, other)


class UserProxy:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        portals: Portals | None = None,
        proxy_name: str | None = None,
        provider: Provider | None = None,
    ) -> None:
        self.settings = settings or Settings()
        #: The proxy mode serving the traffic: the userspace proxier (with `portals`, when
        #: given) unless the caller built another.
        self.provider: Provider = provider or _userspace(self.settings, portals)
        self.router = ObjectRouter(
            self.provider,
            proxy_name=proxy_name,
            external_ips=self._external_ip_policy(),
            node_port_range=self.settings.sources.node_port_range,
        )
        self.runner = SyncRunner(
            self._sync,
            min_interval=self.settings.min_sync_period,
            max_interval=self.settings.sync_period,
        )
        self.provider.request_sync = self.runner.request
        #: The background sync loop, once started.
        self.sync_task: asyncio.Task[None] | None = None
        #: Called after every successful sync (the composition root records proxy ports).
        self.after_sync: list[Callable[[], None]] = []
        #: Leave the rules in place on stop (a successor serves them, or will).
        self.keep_rules = False
        self._started = False

    def _external_ip_policy(self) -> ExternalIPPolicy:
        return ExternalIPPolicy(self.settings.external_ip_cidrs, local_addresses())

    async def _sync(self) -> None:
        # The node's addresses can change: look again before each sync, but only while some
        # Service has externalIPs (reading them costs a /proc read).
        if self.router.external_ips.has_external_ips:
            self.router.set_external_ip_policy(self._external_ip_policy())
        await self.provider.sync()
        for hook in self.after_sync:
            hook()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the provider, run the first sync, then keep syncing in the background."""
        self._started = True
        await self.provider.start()
        await self.runner.run_once()
        self.sync_task = tasks.guarded(self.runner.run_forever(), name="sync")

    async def stop(self) -> None:
        """Stop syncing and close every listener and connection (and the portals)."""
        if self.sync_task is not None:
            await tasks.stop_all([self.sync_task])
            self.sync_task = None
        await self.provider.close(keep_rules=self.keep_rules)

    async def close_unstarted(self) -> None:
        """Let go of what the provider holds when `start()` was never called."""
        if not self._started:
            await self.provider.close()

    async def __aenter__(self) -> UserProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ declaring objects
    async def apply(self, *objects: Mapping[str, Any] | str) -> None:
        """Add or replace Services, EndpointSlices or Endpoints, and sync."""
        for item in objects:
            docs = list(yaml.safe_load_all(item)) if isinstance(item, str) else [item]
            for doc in docs:
                if doc:
                    self.router.upsert(doc, origin="UserProxy.apply")
        await self.runner.run_once()

    async def delete(self, kind: str, name: str, *, namespace: str = "default") -> None:
        """Remove an object applied earlier (kind: Service, EndpointSlice or Endpoints)."""
        self.router.delete(
            object_key({"kind": kind, "metadata": {"name": name, "namespace": namespace}})
        )
        await self.runner.run_once()

    # ------------------------------------------------------------------ reading state
    def status(self) -> ProxyStatus:
        """What is served now, with every counter this process and its workers keep, and the
        objects that were refused."""
        refused = tuple(
            RefusedObject(kind, namespace, name, origin, reason)
            for (kind, namespace, name), (origin, reason) in sorted(self.router.refused.items())
        )
        return dataclasses.replace(self.provider.status(), refused=refused)

    async def read_status(self) -> ProxyStatus:
        """`status()` with counters kept outside the process (the kernel's) read first."""
        await self.provider.read_counters()
        return self.status()

    def service_ports(self) -> list[ServicePortStatus]:
        return list(self.status().service_ports)

    def _port(self, name: str | ServicePortName) -> ServicePortStatus:
        found = self.status().find(name)
        if found is None:
            raise UnknownServicePort(f"{name} is not being served")
        return found

    def proxy_port(self, name: str | ServicePortName) -> int:
        """The local port serving `namespace/name:port` (or `namespace/name` if unnamed)."""
        port = self._port(name).proxy_port
        if port is None:
            raise UnknownServicePort(f"{name} is served by the kernel, not on a proxy port")
        return port

    def counters(self, name: str | ServicePortName) -> CountersSnapshot:
        """Totals over the service port's endpoints (connections or UDP flows, bytes, ...)."""
        return self._port(name).totals()

    def endpoint_counters(self, name: str | ServicePortName) -> dict[str, CountersSnapshot]:
        return {str(e.endpoint): e.counters for e in self._port(name).endpoints if e.counters}
