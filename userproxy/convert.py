"""Kubernetes objects (plain dicts, as parsed from YAML or JSON) into the proxy's value types.

Every function here is pure. A Service the proxy will not serve comes back with a `skipped`
sentence (headless, ExternalName, no ClusterIP: not errors, nothing to do); an object that is
wrong raises `InvalidObject` naming it and the reason; a single port that cannot be served
(SCTP) is refused in `problems` while the others are served.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from userproxy.model import (
    DEFAULT_AFFINITY_TIMEOUT_S,
    NO_AFFINITY,
    Affinity,
    Endpoint,
    EndpointInfo,
    Family,
    Protocol,
    ServicePort,
    ServicePortName,
)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
#: The Service annotation asking the userspace proxy to tell TCP backends who the client is
#: with a PROXY protocol header (`userspace.proxyproto`): `v1` (text) or `v2` (binary).
PROXY_PROTOCOL_ANNOTATION = "userproxy.io/proxy-protocol"
PROXY_PROTOCOL_VERSIONS = {"v1": 1, "v2": 2}
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"

Obj = Mapping[str, Any]


class InvalidObject(ValueError):
    """A Kubernetes object the proxy cannot understand; the message names it and says why."""


@dataclass(frozen=True)
class ServiceResult:
    ports: tuple[ServicePort, ...] = ()
    skipped: str | None = None
    problems: tuple[str, ...] = ()


#: (port name, protocol) -> endpoints, as one EndpointSlice or Endpoints object lists them.
PortEndpoints = dict[tuple[str, Protocol], tuple[EndpointInfo, ...]]


@dataclass(frozen=True)
class EndpointsResult:
    """The endpoints one EndpointSlice (or core/v1 Endpoints object) contributes to a Service."""

    service: tuple[str, str]
    source: str
    ports: PortEndpoints = field(default_factory=dict)
    skipped: str | None = None


def describe(obj: Obj) -> str:
    """`Kind namespace/name` for messages, tolerant of missing fields."""
    md = obj.get("metadata") if isinstance(obj, Mapping) else None
    md = md if isinstance(md, Mapping) else {}
    kind = obj.get("kind", "object") if isinstance(obj, Mapping) else "object"
    return f"{kind} {md.get('namespace') or 'default'}/{md.get('name') or '?'}"


def _metadata(obj: Obj) -> tuple[str, str, Mapping[str, str]]:
    md = obj.get("metadata")
    if not isinstance(md, Mapping) or not isinstance(md.get("name"), str) or not md["name"]:
        raise InvalidObject(f"{describe(obj)}: metadata.name is missing")
    labels = md.get("labels") or {}
    if not isinstance(labels, Mapping):
        raise InvalidObject(f"{describe(obj)}: metadata.labels is not a mapping")
    namespace = md.get("namespace") or "default"
    problem = (
        _name_problem(namespace, DNS1123_LABEL, 63, "metadata.namespace")
        or _name_problem(md["name"], DNS1123_SUBDOMAIN, 253, "metadata.name")
        or next(
            (
                f"label {key!r} has an invalid value {value!r}"
                for key, value in labels.items()
                if not isinstance(value, str) or len(value) > 63 or not LABEL_VALUE.fullmatch(value)
            ),
            None,
        )
    )
    if problem:
        raise InvalidObject(f"{describe(obj)}: {problem}")
    return namespace, md["name"], labels


# The API server's name rules (k8s.io/apimachinery validation), which every name in a rule
# comment and a log line is then known to follow.
DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
#: IANA_SVC_NAME: a port name.
PORT_NAME = re.compile(r"(?=.*[a-z])(?!-)(?!.*--)[a-z0-9-]*[a-z0-9]")


def _name_problem(value: Any, pattern: re.Pattern[str], limit: int, field: str) -> str | None:
    if not isinstance(value, str):
        return f"{field} {value!r} is not a string"
    if len(value) > limit or not pattern.fullmatch(value):
        return f"{field} {value!r} is not a valid name"
    return None


def _port_number(value: Any, *, what: str, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise ValueError(f"{what} {value!r} is not a port number ({low}-65535)")
    return value


def _ip(value: Any, *, what: str) -> str:
    text = str(value)
    # Fast path for the common case, an IPv4 address already in canonical form (4x faster
    # than ipaddress, which a 10,000-service LIST calls 20,000 times).
    with contextlib.suppress(OSError):
        if socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, text)) == text:
            return text
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an IP address") from None


def _protocol(value: Any) -> Protocol | str:
    """The port's protocol, or the refusal sentence for one the userspace proxy cannot carry.
    As in the API, the names are case-sensitive: `tcp` is not TCP."""
    name = "TCP" if value is None or value == "" else value
    if name == "SCTP":
        return "SCTP is not supported by the userspace proxy"
    if name in ("TCP", "UDP"):
        return Protocol(name)
    return f"unknown protocol {value!r} (TCP, UDP or SCTP)"


def _special_ip(ip: str) -> str | None:
    """Why an address may not be an externalIP or an endpoint, as the API server says it:
    unspecified, loopback, link-local and link-local multicast addresses are refused."""
    address = ipaddress.ip_address(ip)
    if address.is_unspecified:
        return "is unspecified"
    if address.is_loopback:
        return "is in the loopback range"
    if address.is_link_local:
        return "is in the link-local range"
    if address.is_multicast:
        return "is a multicast address"
    if address == ipaddress.IPv4Address("255.255.255.255"):
        return "is the broadcast address"
    return None


def _affinity(spec: Obj) -> Affinity:
    if spec.get("sessionAffinity") != "ClientIP":
        return NO_AFFINITY
    cfg = (spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}
    timeout = cfg.get("timeoutSeconds") or DEFAULT_AFFINITY_TIMEOUT_S
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 < timeout <= 86400:
        raise ValueError(f"sessionAffinityConfig.clientIP.timeoutSeconds {timeout!r} is invalid")
    return Affinity(client_ip=True, timeout_s=timeout)


def service_skip_reason(spec: Obj) -> str | None:
    if spec.get("type") == "ExternalName":
        return "type ExternalName is resolved by DNS, not proxied"
    cluster_ip = spec.get("clusterIP")
    if cluster_ip in (None, ""):
        return "it has no ClusterIP"
    if cluster_ip == "None":
        return "it is headless (clusterIP: None)"
    return None


def service_ports(obj: Obj) -> ServiceResult:
    """The service ports of a v1 Service, or why there are none."""
    namespace, name, _ = _metadata(obj)
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        raise InvalidObject(f"{describe(obj)}: spec is missing")
    if reason := service_skip_reason(spec):
        return ServiceResult(skipped=reason)
    try:
        result = _service_ports(namespace=namespace, name=name, spec=spec, status=obj.get("status"))
        version = _proxy_protocol(obj.get("metadata") or {})
        if version:
            ports = tuple(dataclasses.replace(p, proxy_protocol=version) for p in result.ports)
            result = dataclasses.replace(result, ports=ports)
        return result
    except (ValueError, TypeError, AttributeError) as err:
        raise InvalidObject(f"{describe(obj)}: {err}") from None


def _source_ranges(spec: Obj) -> tuple[str, ...]:
    """`loadBalancerSourceRanges`, in normal form (kube-proxy also trims spaces)."""
    out = []
    for value in _list(spec, "loadBalancerSourceRanges"):
        if not isinstance(value, str):
            raise ValueError(f"loadBalancerSourceRanges entry {value!r} is not a string")
        try:
            out.append(str(ipaddress.ip_network(value.strip(), strict=False)))
        except ValueError:
            raise ValueError(f"loadBalancerSourceRanges entry {value!r} is not a CIDR") from None
    return tuple(out)


def _proxy_protocol(metadata: Obj) -> int:
    """The PROXY protocol version the Service asks for by annotation (0: none)."""
    annotations = metadata.get("annotations") or {}
    if not isinstance(annotations, Mapping):
        raise ValueError("metadata.annotations is not a mapping")
    value = annotations.get(PROXY_PROTOCOL_ANNOTATION)
    if value is None:
        return 0
    if value not in PROXY_PROTOCOL_VERSIONS:
        raise ValueError(
            f"annotation {PROXY_PROTOCOL_ANNOTATION}={value!r} is not one of "
            f"{', '.join(PROXY_PROTOCOL_VERSIONS)}"
        )
    return PROXY_PROTOCOL_VERSIONS[value]


def _cluster_ips(spec: Obj) -> tuple[str, ...]:
    """The Service's cluster IPs, one per family, primary first (`clusterIPs`, which the API
    server fills for every Service since dual-stack; `clusterIP` alone in older objects)."""
    primary = _ip(spec["clusterIP"], what="clusterIP")
    listed = [_ip(ip, what="clusterIPs entry") for ip in _list(spec, "clusterIPs")] or [primary]
    if listed[0] != primary:
        raise ValueError(f"clusterIPs[0] {listed[0]} is not clusterIP {primary}")
    families = [Family.of(ip) for ip in listed]
    if len(listed) > 2 or len(set(families)) != len(families):
        raise ValueError(f"clusterIPs {listed} must hold at most one address of each family")
    declared = _list(spec, "ipFamilies")
    if declared and [str(f) for f in declared[: len(families)]] != [f.value for f in families]:
        raise ValueError(
            f"ipFamilies {list(declared)} do not match clusterIPs {listed} (same order expected)"
        )
    return tuple(listed)


def _service_ports(*, namespace: str, name: str, spec: Obj, status: Any) -> ServiceResult:
    """One service port per port and per cluster IP: a dual-stack Service is served in each
    family, with that family's externalIPs and load-balancer IPs."""
    external_ips = tuple(_ip(ip, what="externalIP") for ip in _list(spec, "externalIPs"))
    for ip in external_ips:
        if reason := _special_ip(ip):
            raise ValueError(f"externalIP {ip} {reason}")
    ingress = ((status or {}).get("loadBalancer") or {}).get("ingress") or ()
    lb_ips = _ingress_ips(ingress)
    cluster_ips = _cluster_ips(spec)
    policy = spec.get("externalTrafficPolicy") or "Cluster"
    if policy not in ("Cluster", "Local"):
        raise ValueError(f"externalTrafficPolicy {policy!r} is not Cluster or Local")
    external_local = policy == "Local"
    ranges = _source_ranges(spec)
    health_port = _port_number(
        spec.get("healthCheckNodePort") or 0, what="healthCheckNodePort", allow_zero=True
    )
    affinity = _affinity(spec)
    ports_spec = _list(spec, "ports")
    ports: list[ServicePort] = []
    problems: list[str] = []
    names: set[str] = set()
    for raw in ports_spec:
        if not isinstance(raw, Mapping):
            raise ValueError(f"spec.ports has an entry that is not a mapping: {raw!r}")
        port_name = _name(raw.get("name"), what="port name")
        if port_name and (len(port_name) > 15 or not PORT_NAME.fullmatch(port_name)):
            raise ValueError(f"port name {port_name!r} is not a valid port name")
        if port_name in names:
            raise ValueError(f"spec.ports has two ports named {port_name!r}")
        names.add(port_name)
        protocol = _protocol(raw.get("protocol"))
        if not isinstance(protocol, Protocol):
            problems.append(f"port {port_name or raw.get('port')!r}: {protocol}")
            continue
        for cluster_ip in cluster_ips:
            family = Family.of(cluster_ip)
            ports.append(
                ServicePort(
                    name=ServicePortName(namespace, name, port_name, protocol),
                    cluster_ip=cluster_ip,
                    port=_port_number(raw.get("port"), what="port"),
                    node_port=_port_number(
                        raw.get("nodePort") or 0, what="nodePort", allow_zero=True
                    ),
                    external_ips=tuple(ip for ip in external_ips if Family.of(ip) is family),
                    load_balancer_ips=tuple(ip for ip in lb_ips if Family.of(ip) is family),
                    affinity=affinity,
                    internal_local=spec.get("internalTrafficPolicy") == "Local",
                    health_check_node_port=health_port,
                    external_local=external_local,
                    source_ranges=tuple(r for r in ranges if Family.of(r) is family),
                )
            )
    return ServiceResult(ports=tuple(ports), problems=tuple(problems))


def _ingress_ips(ingress: Any) -> tuple[str, ...]:
    """The load-balancer IPs the node intercepts. Hostname-only entries (AWS ELB style) have
    nothing to intercept, and neither has `ipMode: Proxy`: that load balancer delivers to the
    node itself (its own address as destination), so a portal for its IP would capture
    traffic meant for the load balancer (as kube-proxy, since 1.30)."""
    if not isinstance(ingress, list | tuple):
        raise ValueError("status.loadBalancer.ingress is not a list")
    out = []
    for entry in ingress:
        if not isinstance(entry, Mapping):
            raise ValueError("status.loadBalancer.ingress has an entry that is not a mapping")
        mode = entry.get("ipMode")
        if mode not in (None, "VIP", "Proxy"):
            raise ValueError(f"status.loadBalancer.ingress ipMode {mode!r} is not VIP or Proxy")
        if entry.get("ip") and mode != "Proxy":
            out.append(_ip(entry["ip"], what="loadBalancer ingress ip"))
    return tuple(out)


def _list(obj: Obj, field: str, *, within: str = "spec.") -> list[Any] | tuple[Any, ...]:
    value = obj.get(field) or ()
    if not isinstance(value, list | tuple):
        raise ValueError(f"{within}{field} is not a list")
    return value


def _name(value: Any, *, what: str) -> str:
    """An optional name: a string or nothing."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{what} {value!r} is not a string")
    return value


# ----------------------------------------------------------------------------- endpoints
def endpoint_slice(obj: Obj) -> EndpointsResult:
    """The endpoints of a discovery.k8s.io/v1 EndpointSlice, grouped by port."""
    namespace, name, labels = _metadata(obj)
    service = labels.get(SERVICE_NAME_LABEL)
    if not service:
        return EndpointsResult((namespace, ""), name, skipped="it has no service-name label")
    if not isinstance(service, str):
        raise InvalidObject(f"{describe(obj)}: label {SERVICE_NAME_LABEL} is not a string")
    address_type = obj.get("addressType", "IPv4")
    if address_type == "FQDN":
        return EndpointsResult((namespace, service), name, skipped="addressType FQDN")
    if address_type not in ("IPv4", "IPv6"):
        raise InvalidObject(f"{describe(obj)}: addressType {address_type!r} is not valid")
    try:
        infos = [info for ep in _list(obj, "endpoints", within="") for info in _slice_endpoint(ep)]
        for ip, _, _ in infos:
            if Family.of(ip).value != address_type:
                raise ValueError(f"endpoint address {ip} is not of addressType {address_type}")
        ports = _group_by_port(_list(obj, "ports", within=""), infos)
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise InvalidObject(f"{describe(obj)}: {err}") from None
    return EndpointsResult((namespace, service), name, ports)


def _slice_endpoint(ep: Obj) -> list[tuple[str, Obj, str | None]]:
    conditions = ep.get("conditions") or {}
    # An unset `ready` means "unknown", which consumers must treat as ready (API docs).
    ready = conditions.get("ready") is not False
    state: dict[str, Any] = {
        "ready": ready,
        "serving": conditions.get("serving", ready) is not False,
        "terminating": conditions.get("terminating") is True,
    }
    node = ep.get("nodeName")
    hints = ep.get("hints")
    if hints is not None:
        if not isinstance(hints, Mapping):
            raise ValueError("endpoint hints is not a mapping")
        state["zones"] = _hint_names(hints, "forZones")
        state["nodes"] = _hint_names(hints, "forNodes")
    return [(_endpoint_ip(a), state, node) for a in ep.get("addresses") or ()]


def _hint_names(hints: Obj, field: str) -> tuple[str, ...] | None:
    """`hints.forZones` / `hints.forNodes` as names; None when the hint is absent."""
    value = hints.get(field)
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(v, Mapping) and isinstance(v.get("name"), str) for v in value
    ):
        raise ValueError(f"endpoint hints.{field} must be a list of {{name: ...}}")
    return tuple(v["name"] for v in value)


def _endpoint_ip(value: Any) -> str:
    """An endpoint address. Unspecified, link-local (169.254.169.254: the cloud's metadata
    service), multicast and broadcast addresses are refused, as the API server refuses them.
    Loopback is allowed: it is how the no-cluster modes reach backends on the node. The
    userspace proxy sends only clients on the node there; the kernel modes leave it out."""
    ip = _ip(value, what="endpoint address")
    reason = _special_ip(ip)
    if reason is not None and "loopback" not in reason:
        raise ValueError(f"endpoint address {ip} {reason}")
    return ip


def _group_by_port(ports: Any, infos: list[tuple[str, Obj, str | None]]) -> PortEndpoints:
    grouped: PortEndpoints = {}
    for port in ports:
        protocol = _protocol(port.get("protocol"))
        if not isinstance(protocol, Protocol) or port.get("port") is None:
            continue
        number = _port_number(port["port"], what="endpoint port")
        grouped[(str(port.get("name") or ""), protocol)] = tuple(
            EndpointInfo(Endpoint(ip, number), node_name=node, **state) for ip, state, node in infos
        )
    return grouped


def endpoints_object(obj: Obj) -> EndpointsResult:
    """The endpoints of a core/v1 Endpoints object (for clusters or files without slices)."""
    namespace, name, labels = _metadata(obj)
    if HEADLESS_LABEL in labels:
        return EndpointsResult((namespace, name), "endpoints", skipped="it is headless")
    grouped: dict[tuple[str, Protocol], list[EndpointInfo]] = {}
    try:
        for subset in obj.get("subsets") or ():
            infos = _subset_addresses(subset)
            for (port_name, protocol), number in _subset_ports(subset):
                bucket = grouped.setdefault((port_name, protocol), [])
                bucket.extend(
                    EndpointInfo(Endpoint(ip, number), ready=ready, serving=ready, node_name=node)
                    for ip, ready, node in infos
                )
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        raise InvalidObject(f"{describe(obj)}: {err}") from None
    ports = {key: tuple(value) for key, value in grouped.items()}
    return EndpointsResult((namespace, name), "endpoints", ports)


def _subset_addresses(subset: Obj) -> list[tuple[str, bool, str | None]]:
    out = []
    for key, ready in (("addresses", True), ("notReadyAddresses", False)):
        for addr in subset.get(key) or ():
            out.append((_endpoint_ip(addr["ip"]), ready, addr.get("nodeName")))
    return out


def _subset_ports(subset: Obj) -> list[tuple[tuple[str, Protocol], int]]:
    out = []
    for port in subset.get("ports") or ():
        protocol = _protocol(port.get("protocol"))
        if not isinstance(protocol, Protocol):
            continue
        out.append(
            ((str(port.get("name") or ""), protocol), _port_number(port["port"], what="port"))
        )
    return out
