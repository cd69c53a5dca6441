"""Which externalIPs may be served. Pure.

An externalIP makes the proxy intercept traffic to that address on the service port, from
pods and from outside: whoever may create a Service may take over traffic (the CVE-2020-8554
pattern). kube-proxy serves any externalIP. userproxy refuses, per Service and with a message:
- an externalIP that is another Service's ClusterIP (it would capture that Service's traffic);
- a node-local address (e.g. the node IP on port 22 would capture the node's sshd), unless the
  allow list names it;
- with an allow list (`--external-ip-cidrs`), any address outside it. An empty list means no
  such restriction: kube-proxy's behaviour, minus the two refusals above.
The refused addresses are left out of the Service; everything else about it is served.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, replace

from userproxy.model import ServicePort

ServiceKey = tuple[str, str]


@dataclass(frozen=True)
class ExternalIPPolicy:
    #: CIDRs externalIPs must fall in; empty: any address (but the refusals above).
    allowed_cidrs: tuple[str, ...] = ()
    #: The node's own addresses.
    local_addresses: frozenset[str] = frozenset()

    def refusal(
        self, ip: str, *, cluster_ips: Mapping[str, ServiceKey], owner: ServiceKey
    ) -> str | None:
        """Why `ip` may not be an externalIP of `owner`'s Service, or None."""
        other = cluster_ips.get(ip)
        if other is not None and other != owner:
            return f"externalIP {ip} is the ClusterIP of Service {other[0]}/{other[1]}"
        allowed = self._allowed(ip)
        if ip in self.local_addresses and not allowed:
            return f"externalIP {ip} is an address of this node (allow with --external-ip-cidrs)"
        if self.allowed_cidrs and not allowed:
            return f"externalIP {ip} is outside --external-ip-cidrs"
        return None

    def _allowed(self, ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return any(address in ipaddress.ip_network(cidr) for cidr in self.allowed_cidrs)

    def apply(
        self,
        ports: tuple[ServicePort, ...],
        *,
        cluster_ips: Mapping[str, ServiceKey],
        owner: ServiceKey,
    ) -> tuple[tuple[ServicePort, ...], list[str]]:
        """The Service's ports with the refused externalIPs left out, and why each was."""
        external = {ip for port in ports for ip in port.external_ips}
        if not external:
            return ports, []
        refused = {
            ip: reason
            for ip in sorted(external)
            if (reason := self.refusal(ip, cluster_ips=cluster_ips, owner=owner))
        }
        if not refused:
            return ports, []
        kept = tuple(
            replace(port, external_ips=tuple(ip for ip in port.external_ips if ip not in refused))
            for port in ports
        )
        return kept, list(refused.values())


@dataclass(frozen=True)
class Emission:
    """A Service's ports as the proxy should now serve them, and new refusals to report."""

    service: ServiceKey
    ports: tuple[ServicePort, ...] | None
    problems: tuple[str, ...] = ()


class ExternalIPGuard:
    """Applies the policy across Services as they come and go: a Service whose externalIP
    becomes (or stops being) another Service's ClusterIP is re-evaluated then, whatever the
    order the two arrived in. Only Services with externalIPs are ever re-evaluated."""

    def __init__(self, policy: ExternalIPPolicy | None = None) -> None:
        self.policy = policy or ExternalIPPolicy()
        self._ports: dict[ServiceKey, tuple[ServicePort, ...]] = {}
        self._owners: dict[str, ServiceKey] = {}
        self._with_external: set[ServiceKey] = set()
        self._emitted: dict[ServiceKey, tuple[ServicePort, ...]] = {}
        self._problems: dict[ServiceKey, tuple[str, ...]] = {}

    @property
    def has_external_ips(self) -> bool:
        return bool(self._with_external)

    def update(self, service: ServiceKey, ports: tuple[ServicePort, ...] | None) -> list[Emission]:
        """The Service's ports changed (None: gone or not served). Returns what to emit: the
        Service itself first, then any other whose served externalIPs changed because of it."""
        old = self._ports.pop(service, ())
        for port in old:
            if self._owners.get(port.cluster_ip) == service:
                del self._owners[port.cluster_ip]
        self._with_external.discard(service)
        if ports:
            self._ports[service] = ports
            for port in ports:
                self._owners.setdefault(port.cluster_ip, service)
            if any(port.external_ips for port in ports):
                self._with_external.add(service)
        out = [self._evaluate(service, always=True)]
        moved = {p.cluster_ip for p in old} ^ {p.cluster_ip for p in ports or ()}
        if moved:
            out += self._recheck(exclude=service)
        return [e for e in out if e is not None]

    def set_policy(self, policy: ExternalIPPolicy) -> list[Emission]:
        if policy == self.policy:
            return []
        self.policy = policy
        return self._recheck()

    def _recheck(self, exclude: ServiceKey | None = None) -> list[Emission]:
        out = []
        for other in sorted(self._with_external - {exclude}):
            emission = self._evaluate(other, always=False)
            if emission is not None:
                out.append(emission)
        return out

    def _evaluate(self, service: ServiceKey, *, always: bool) -> Emission | None:
        ports = self._ports.get(service)
        problems: list[str] = []
        if ports:
            ports, problems = self.policy.apply(ports, cluster_ips=self._owners, owner=service)
        before = self._emitted.get(service)
        if ports:
            self._emitted[service] = ports
        else:
            self._emitted.pop(service, None)
        new = tuple(p for p in problems if p not in self._problems.get(service, ()))
        if problems:
            self._problems[service] = tuple(problems)
        else:
            self._problems.pop(service, None)
        if not always and before == (ports or None):
            return None
        return Emission(service, ports or None, new)
