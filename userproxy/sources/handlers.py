"""What sources call, through the router: the handlers every proxy mode implements (the
role of kube-proxy's `config.ServiceHandler` and `EndpointSliceHandler`). Pure."""

from __future__ import annotations

from typing import Protocol

from userproxy.changes import ServiceKey
from userproxy.convert import EndpointsResult
from userproxy.model import ServicePort


class SourceSink(Protocol):
    def on_service(self, key: ServiceKey, ports: tuple[ServicePort, ...] | None) -> None:
        """A Service's ports now (None: the Service is gone or not served)."""
        ...

    def on_endpoints(self, result: EndpointsResult) -> None:
        """What one EndpointSlice (or Endpoints object) contributes now."""
        ...

    def on_endpoints_deleted(self, service: ServiceKey, source: str) -> None: ...
