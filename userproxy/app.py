"""`UserProxy`: one proxy instance on the caller's event loop. The CLI runs exactly this.

    async with UserProxy(ProxySettings(bind_address="127.0.0.1", allow_loopback_bind=True)) as p:
        await p.apply(service(...), endpoint_slice(...))
        port = p.proxy_port("default/web:http")

Objects are plain Kubernetes dicts (or YAML text). `apply` and `delete` sync at once, so the
proxy ports are ready when they return; sources that stream changes (files, the API) go through
the bounded-frequency runner instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import structlog
import yaml

from userproxy.iptables_mode.provider import KernelProxier
from userproxy.model import ServicePortName
from userproxy.runner import SyncRunner
from userproxy.settings import ProxySettings
from userproxy.sources.router import ObjectRouter, object_key
from userproxy.userspace.portals.interface import ActivePort, Portals
from userproxy.userspace.proxier import PortRuntime, Proxier
from userproxy.userspace.stats import CountersSnapshot

log = structlog.get_logger("userproxy")


class UnknownServicePort(KeyError):
    pass


class UserProxy:
    def __init__(
        self,
        settings: ProxySettings | None = None,
        *,
        portals: Portals | None = None,
        proxy_name: str | None = None,
        proxier: Proxier | KernelProxier | None = None,
    ) -> None:
        self.settings = settings or ProxySettings()
        self.portals = portals
        #: The userspace proxier, or the iptables mode's (given by the caller).
        self.proxier = proxier or Proxier(settings=self.settings, portals=portals)
        self.router = ObjectRouter(self.proxier, proxy_name=proxy_name)
        self.runner = SyncRunner(
            self.proxier.sync,
            min_interval=self.settings.min_sync_period,
            max_interval=self.settings.sync_period,
        )
        self.proxier.request_sync = self.runner.request
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Run the first sync, then keep syncing in the background."""
        await self.runner.run_once()
        self._task = asyncio.get_running_loop().create_task(
            self.runner.run_forever(), name="userproxy-sync"
        )

    async def stop(self) -> None:
        """Stop syncing and close every listener and connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.portals is not None:
            await self.portals.close()
        await self.proxier.shutdown()

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
    def service_ports(self) -> list[ActivePort]:
        return self.proxier.active_ports()

    def _runtime(self, name: str | ServicePortName) -> PortRuntime:
        for spn, runtime in self.proxier.runtimes.items():
            if spn == name or str(spn) == name:
                return runtime
        raise UnknownServicePort(f"{name} is not being served")

    def proxy_port(self, name: str | ServicePortName) -> int:
        """The local port serving `namespace/name:port` (or `namespace/name` if unnamed)."""
        return self._runtime(name).proxy_port

    def counters(self, name: str | ServicePortName) -> CountersSnapshot:
        """Totals over the service port's endpoints (connections or UDP flows, bytes, ...)."""
        return self._runtime(name).stats.totals()

    def endpoint_counters(self, name: str | ServicePortName) -> dict[str, CountersSnapshot]:
        return {str(ep): c for ep, c in self._runtime(name).stats.per_endpoint().items()}
