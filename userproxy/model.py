"""Value types of the proxy: what a service port is, and where its endpoints are.

Everything here is immutable and hashable, so it can be compared between syncs, used as a
dictionary key and handed across tasks without copying. Converting Kubernetes objects into
these types lives in `userproxy.convert`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: Kubernetes' default for `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
DEFAULT_AFFINITY_TIMEOUT_S = 10800


class Protocol(enum.StrEnum):
    TCP = "TCP"
    UDP = "UDP"


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

    @property
    def protocol(self) -> Protocol:
        return self.name.protocol

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
        )


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """A backend address: what the balancer hands out and the relay dials."""

    ip: str
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """An endpoint as a source reported it, with the conditions that decide whether it is used."""

    endpoint: Endpoint
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None


def usable_endpoints(
    infos: tuple[EndpointInfo, ...] | list[EndpointInfo],
    *,
    local_node: str | None = None,
) -> list[Endpoint]:
    """The endpoints traffic may go to, deduplicated and sorted.

    Ready endpoints are used; serving-but-terminating ones only when no ready endpoint exists
    (so a rolling update does not black-hole traffic). With `local_node` set
    (`internalTrafficPolicy: Local`) only endpoints on that node count.
    """
    if local_node is not None:
        infos = [i for i in infos if i.node_name == local_node]
    ready = {i.endpoint for i in infos if i.ready}
    if not ready:
        ready = {i.endpoint for i in infos if i.serving and i.terminating}
    return sorted(ready)
