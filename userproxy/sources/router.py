"""Routes Kubernetes objects from any source (files, the API, Python code) to the provider.

It converts each object, reports the ones that cannot be served (one clear log line naming the
object and the reason, and a counter) and remembers what each object contributed, so that a
deletion, or a full replacement of the object set, removes exactly that.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import structlog

from userproxy import convert
from userproxy.changes import ServiceKey
from userproxy.externalips import Emission, ExternalIPGuard, ExternalIPPolicy
from userproxy.model import ServicePort
from userproxy.ports import PortRange
from userproxy.sources.handlers import SourceSink

log = structlog.get_logger("userproxy.objects")

ObjectKey = tuple[str, str, str]  # kind, namespace, name
KINDS = ("Service", "EndpointSlice", "Endpoints")


def _metadata(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    """The object's metadata if it is a mapping (the converter refuses it otherwise)."""
    md = obj.get("metadata")
    return md if isinstance(md, Mapping) else {}


def _version(obj: Mapping[str, Any]) -> str:
    return str(_metadata(obj).get("resourceVersion") or "")


def object_key(obj: Mapping[str, Any]) -> ObjectKey:
    md = _metadata(obj)
    return (str(obj.get("kind")), str(md.get("namespace") or "default"), str(md.get("name")))


@dataclass(frozen=True)
class _Routed:
    service: ServiceKey
    source: str


class ObjectRouter:
    def __init__(
        self,
        sink: SourceSink,
        *,
        proxy_name: str | None = None,
        external_ips: ExternalIPPolicy | None = None,
        node_port_range: PortRange | None = None,
    ) -> None:
        self.sink = sink
        #: NodePorts must fall in this range, as the API server's `--service-node-port-range`
        #: makes them (None: not checked; objects from the API server were checked there).
        self.node_port_range = node_port_range
        #: Which externalIPs may be served, across Services (see `userproxy.externalips`).
        self.external_ips = ExternalIPGuard(external_ips)
        #: `--service-proxy-name`: serve only Services carrying this proxy-name label value
        #: (None: serve the Services that carry no such label, like kube-proxy).
        self.proxy_name = proxy_name
        self._routed: dict[ObjectKey, _Routed] = {}
        #: resourceVersion of each object last routed, so a relist skips unchanged objects.
        self._seen: dict[ObjectKey, str] = {}
        self.rejected = 0
        #: Objects refused and not replaced or deleted since: (origin, reason) per object.
        self.refused: dict[ObjectKey, tuple[str, str]] = {}
        #: Changes routed, per kind (kube-proxy's *_changes_total).
        self.changes: Counter[str] = Counter()

    def upsert(self, obj: Mapping[str, Any], *, origin: str = "") -> bool:
        """Add or replace one object. Returns False (after logging why) if it was refused;
        nothing in the object can make it raise."""
        if not isinstance(obj, Mapping):
            self._refuse(origin, f"it is a {type(obj).__name__}, not a Kubernetes object")
            return False
        key = object_key(obj)
        self.changes[key[0]] += 1
        version = _version(obj)
        if version:
            self._seen[key] = version
        try:
            self._upsert(key, obj)
        except convert.InvalidObject as err:
            reason = str(err)
        except Exception as err:  # a shape the converter did not foresee: still only refused
            reason = f"{convert.describe(obj)}: cannot be read ({type(err).__name__}: {err})"
        else:
            self.refused.pop(key, None)
            return True
        self._refuse(origin, reason)
        self.delete(key)
        self.refused[key] = (origin, reason)
        return False

    def _refuse(self, origin: str, reason: str) -> None:
        self.rejected += 1
        log.error("Refused an object that cannot be served.", origin=origin or None, reason=reason)

    def _upsert(self, key: ObjectKey, obj: Mapping[str, Any]) -> None:
        kind = key[0]
        if kind == "Service":
            self._service(key, obj)
        elif kind == "EndpointSlice":
            self._endpoints(key, convert.endpoint_slice(obj))
        elif kind == "Endpoints":
            self._endpoints(key, convert.endpoints_object(obj))
        else:
            raise convert.InvalidObject(f"{convert.describe(obj)}: kind {kind!r} is not proxied")

    def _service(self, key: ObjectKey, obj: Mapping[str, Any]) -> None:
        service = (key[1], key[2])
        labels = _metadata(obj).get("labels")
        labels = labels if isinstance(labels, Mapping) else {}
        if labels.get(convert.SERVICE_PROXY_NAME_LABEL) != self.proxy_name:
            self._routed[key] = _Routed(service, "")
            self._emit(self.external_ips.update(service, None))
            log.debug("Skipping a Service that belongs to another proxy.", service=key[1:])
            return
        result = convert.service_ports(obj)
        for problem in result.problems:
            self.rejected += 1
            log.error("Refused a service port.", service=f"{key[1]}/{key[2]}", reason=problem)
        if result.skipped:
            log.debug(
                "Not proxying a Service.", service=f"{key[1]}/{key[2]}", reason=result.skipped
            )
        ports = self._node_ports_in_range(f"{key[1]}/{key[2]}", result.ports)
        self._routed[key] = _Routed(service, "")
        self._emit(self.external_ips.update(service, ports or None))

    def _node_ports_in_range(
        self, service: str, ports: tuple[ServicePort, ...]
    ) -> tuple[ServicePort, ...]:
        allowed = self.node_port_range
        if allowed is None or all(not p.node_port or p.node_port in allowed for p in ports):
            return ports
        kept = []
        for port in ports:
            if port.node_port and port.node_port not in allowed:
                self.rejected += 1
                log.error("Refused a NodePort; the rest of the Service is served.",
                          service=service, reason=f"NodePort {port.node_port} is outside "
                          f"the node-port range {allowed}")  # fmt: skip
                port = replace(port, node_port=0)
            kept.append(port)
        return tuple(kept)

    def _emit(self, emissions: list[Emission]) -> None:
        for emission in emissions:
            name = f"{emission.service[0]}/{emission.service[1]}"
            for problem in emission.problems:
                self.rejected += 1
                log.error("Refused an externalIP; the rest of the Service is served.",
                          service=name, reason=problem)  # fmt: skip
            self.sink.on_service(emission.service, emission.ports)

    def set_external_ip_policy(self, policy: ExternalIPPolicy) -> None:
        """New allow list or node addresses: re-evaluate the Services with externalIPs."""
        self._emit(self.external_ips.set_policy(policy))

    def _endpoints(self, key: ObjectKey, result: convert.EndpointsResult) -> None:
        before = self._routed.get(key)
        if before is not None and before.service != result.service:
            self.sink.on_endpoints_deleted(before.service, before.source)
        if result.skipped:
            self._routed.pop(key, None)
            if before is not None and before.service == result.service:
                self.sink.on_endpoints_deleted(before.service, before.source)
            return
        self._routed[key] = _Routed(result.service, result.source)
        self.sink.on_endpoints(result)

    def delete(self, key: ObjectKey) -> None:
        self._seen.pop(key, None)
        self.refused.pop(key, None)
        routed = self._routed.pop(key, None)
        if routed is None:
            return
        self.changes[key[0]] += 1
        if key[0] == "Service":
            self._emit(self.external_ips.update(routed.service, None))
        else:
            self.sink.on_endpoints_deleted(routed.service, routed.source)

    def replace_all(
        self,
        objects: Iterable[tuple[Mapping[str, Any], str]],
        *,
        kinds: Iterable[str] | None = None,
    ) -> None:
        """Make the routed set equal `objects` ((object, origin) pairs): the resync path.
        With `kinds`, only objects of those kinds are replaced (one resource's relist)."""
        scope = set(kinds) if kinds is not None else None
        wanted: dict[ObjectKey, tuple[Mapping[str, Any], str]] = {}
        for obj, origin in objects:
            wanted[object_key(obj)] = (obj, origin)
        for key in (set(self._routed) | set(self.refused)) - set(wanted):
            if scope is None or key[0] in scope:
                self.delete(key)
        for key, (obj, origin) in wanted.items():
            if self._seen.get(key) != _version(obj):
                self.upsert(obj, origin=origin)

    @property
    def keys(self) -> set[ObjectKey]:
        return set(self._routed)
