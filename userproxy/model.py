"""Value types of the proxy: what a service port is, and where its endpoints are.

Everything here is immutable and hashable, so it can be compared between syncs, used as a
dictionary key and handed across tasks without copying. Converting Kubernetes objects into
these types lives in `userproxy.convert`.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from dataclasses import dataclass, field

#: Kubernetes' default for `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
DEFAULT_AFFINITY_TIMEOUT_S = 10800


class Protocol(enum.StrEnum):
    TCP = "TCP"
    UDP = "UDP"


class Family(enum.StrEnum):
    """An address family, named as Kubernetes' `ipFamilies` and EndpointSlice `addressType`.

    Decided once, when a value is built: the converters store addresses in `ipaddress`' normal
    form, where an IPv6 address always has a colon and an IPv4 one never does. Everything
    downstream (sockets, rule builders, worker steering) reads the family, never the text.
    """

    IPv4 = "IPv4"
    IPv6 = "IPv6"

    @classmethod
    def of(cls, address: str) -> Family:
        return cls.IPv6 if ":" in address else cls.IPv4

    @property
    def socket_family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if self is Family.IPv6 else socket.AF_INET

    @property
    def tool(self) -> str:
        """The iptables binary family: `iptables` or `ip6tables`."""
        return "ip6tables" if self is Family.IPv6 else "iptables"

    def host_cidr(self, address: str) -> str:
        """The one-address network of `address` (`/32` or `/128`)."""
        return f"{address}/128" if self is Family.IPv6 else f"{address}/32"

    def address_port(self, address: str, port: int) -> str:
        """`address:port`, with IPv6 addresses in brackets."""
        return f"[{address}]:{port}" if self is Family.IPv6 else f"{address}:{port}"


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """One port of one Service: `namespace/name:port`, or `namespace/name` for an unnamed port.

    The string form is also the comment on every iptables rule of the port. A Service's port
    names are unique within it, so the protocol is carried along but not shown.
    """

    namespace: str
    name: str
    port: str = ""
    protocol: Protocol = Protocol.TCP

    def __str__(self) -> str:
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port}" if self.port else base

    @property
    def service(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class Affinity:
    """ClientIP session affinity; `client_ip=False` means none."""

    client_ip: bool = False
    timeout_s: int = DEFAULT_AFFINITY_TIMEOUT_S


NO_AFFINITY = Affinity()


@dataclass(frozen=True, slots=True)
class ServicePort:
    """Everything the proxy needs to serve one service port."""

    name: ServicePortName
    cluster_ip: str
    port: int
    node_port: int = 0
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    affinity: Affinity = NO_AFFINITY
    #: `internalTrafficPolicy: Local`: only endpoints on this node serve cluster traffic.
    internal_local: bool = False
    #: PROXY protocol version written to backends first (0: none), userspace TCP only.
    proxy_protocol: int = 0
    #: `spec.healthCheckNodePort`: where this node says whether it has local endpoints.
    health_check_node_port: int = 0
    #: `externalTrafficPolicy: Local`: traffic from outside (NodePort, externalIPs,
    #: load-balancer IPs) goes only to endpoints on this node, and is dropped without one.
    external_local: bool = False
    #: `loadBalancerSourceRanges`: only these sources may use the load-balancer IPs (empty:
    #: anyone). Only this family's ranges.
    source_ranges: tuple[str, ...] = ()
    #: The family of `cluster_ip`; set when the value is built.
    family: Family = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "family", Family.of(self.cluster_ip))

    def external_ips_of(self, family: Family) -> tuple[str, ...]:
        """The externalIPs of one family (a Service may list both)."""
        return tuple(ip for ip in self.external_ips if Family.of(ip) is family)

    def load_balancer_ips_of(self, family: Family) -> tuple[str, ...]:
        return tuple(ip for ip in self.load_balancer_ips if Family.of(ip) is family)

    @property
    def protocol(self) -> Protocol:
        return self.name.protocol

    @property
    def external_local_in_force(self) -> bool:
        """`externalTrafficPolicy: Local` with some external path for it to apply to."""
        return self.external_local and bool(
            self.node_port or self.external_ips or self.load_balancer_ips
        )

    def listener_identity(self) -> tuple[object, ...]:
        """The fields whose change rebuilds the listener on a new proxy port.

        Matches the old userspace proxier's `sameConfig`, which ignores the affinity timeout:
        changing only the timeout updates the balancer in place.
        """
        return (
            self.protocol,
            self.port,
            self.node_port,
            self.cluster_ip,
            self.external_ips,
            self.load_balancer_ips,
            self.affinity.client_ip,
            self.external_local_in_force,
            self.source_ranges,
        )


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """A backend address: what the balancer hands out and the relay dials."""

    ip: str
    port: int
    #: The family of `ip`; set when the value is built.
    family: Family = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "family", Family.of(self.ip))

    def __str__(self) -> str:
        return self.family.address_port(self.ip, self.port)


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """An endpoint as a source reported it, with the conditions that decide whether it is used."""

    endpoint: Endpoint
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    #: Topology hints the EndpointSlice controller set: the zones (`hints.forZones`) and
    #: nodes (`hints.forNodes`) whose clients should use this endpoint. None: no hint.
    zones: tuple[str, ...] | None = None
    nodes: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Topology:
    """Where this node is, for topology-aware routing."""

    node: str = ""
    zone: str = ""


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1: the node's private side, which no pod may be sent to."""
    if ip.startswith("127."):
        return True
    if ":" not in ip:
        return False  # an IPv4 address outside 127.0.0.0/8 (checked per endpoint per sync)
    return ipaddress.ip_address(ip).is_loopback


def usable_endpoints(
    infos: tuple[EndpointInfo, ...] | list[EndpointInfo],
    *,
    local_node: str | None = None,
    topology: Topology | None = None,
) -> list[Endpoint]:
    """The endpoints traffic may go to, deduplicated and sorted.

    Ready endpoints are used; serving-but-terminating ones only when no ready endpoint exists
    (so a rolling update does not black-hole traffic). With `local_node` set
    (`internalTrafficPolicy: Local`) only endpoints on that node count. Otherwise, with a
    `topology`, the hints narrow them as kube-proxy does (see `by_hints`).
    """
    if local_node is not None:
        infos = [i for i in infos if i.node_name == local_node]
    chosen = [i for i in infos if i.ready]
    if not chosen:
        chosen = [i for i in infos if i.serving and i.terminating]
    if local_node is None and topology is not None:
        chosen = by_hints(chosen, topology)
    return sorted({i.endpoint for i in chosen})


def by_hints(infos: list[EndpointInfo], topology: Topology) -> list[EndpointInfo]:
    """Topology-aware routing, with upstream's fallbacks: hints are used only when every
    endpoint carries them (a partial set means the controller is mid-update); node hints
    (`PreferSameNode`) win when one names this node; then zone hints (`PreferClose`,
    `PreferSameZone`, topology-mode Auto) when one names this node's zone; else everything."""
    if not infos:
        return infos
    if topology.node and all(i.nodes is not None for i in infos):
        here = [i for i in infos if topology.node in (i.nodes or ())]
        if here:
            return here
    if topology.zone and all(i.zones is not None for i in infos):
        near = [i for i in infos if topology.zone in (i.zones or ())]
        if near:
            return near
    return infos
