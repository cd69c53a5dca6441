"""The portals as one nftables table of maps (`--portals-backend nftables`). Pure.

The same contract as the iptables portals (rules.py), with one map element per path instead of
one rule, so 10,000 service ports cost 10,000 elements in a handful of maps, and a change is an
element added or deleted:

  nat-prerouting  (nat, prerouting, dstnat)
      daddr . proto . dport . saddr -> proxy port  @portals-ranged   LB IPs with source ranges
      daddr . proto . dport -> proxy port          @portals          ClusterIP, LB IP, externalIP
      local daddr, not loopback: proto . dport     @nodeports        NodePorts
    REDIRECT to the proxy port (a specific --bind-address: DNAT to it, values `addr . port`)
  nat-output      (nat, output, dstnat): the node's own traffic, DNAT to the node IP
      @portals-host (ClusterIP, LB IP), @portals-host-local (externalIPs that are the node's),
      @nodeports-host (every local address, loopback included: localhost NodePorts are the
      node's own)
  filter-input    (filter, input, filter-1)
      a proxy port reached from another host without a portal's NAT -> reject (@proxy-ports)
      a service port without endpoints -> reject (@refused-ports)
      `externalTrafficPolicy: Local` with no local endpoint -> drop (@dropped-ports)
      an LB IP with source ranges, from outside them (not redirected) -> drop (@firewalled)

Not carried over: KUBE-NODEPORT-NON-LOCAL's ACCEPT. An accept in one nftables table does not
override a drop in another table's chain at the same hook, so no table of ours can open a
port in the host's own nftables firewall; the iptables portals still can.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from userproxy.nftables.transaction import BaseChain, Chain, Element, Rule, Set, Table, Transaction
from userproxy.userspace.portals.rules import PortalConfig, PortalPort

TABLE = "userproxy-portals"
TABLE_COMMENT = "userproxy userspace-mode portals"
NAT_PREROUTING = "nat-prerouting"
NAT_OUTPUT = "nat-output"
FILTER_INPUT = "filter-input"
BASE_CHAINS = (
    Chain(NAT_PREROUTING, BaseChain("nat", "prerouting", -100)),
    Chain(NAT_OUTPUT, BaseChain("nat", "output", -100)),
    Chain(FILTER_INPUT, BaseChain("filter", "input", -1)),
)
PORTALS = "portals"
PORTALS_RANGED = "portals-ranged"
PORTALS_HOST = "portals-host"
PORTALS_HOST_LOCAL = "portals-host-local"
NODEPORTS = "nodeports"
NODEPORTS_HOST = "nodeports-host"
NODEPORT_IPS = "nodeport-ips"
NODEPORT_HOST_IPS = "nodeport-host-ips"
PROXY_PORTS = "proxy-ports"
REFUSED_PORTS = "refused-ports"
DROPPED_PORTS = "dropped-ports"
FIREWALLED = "firewalled"
#: Sets and maps whose elements come from the service ports.
PORT_CONTAINERS = (
    PORTALS,
    PORTALS_RANGED,
    PORTALS_HOST,
    PORTALS_HOST_LOCAL,
    NODEPORTS,
    NODEPORTS_HOST,
    PROXY_PORTS,
    REFUSED_PORTS,
    DROPPED_PORTS,
    FIREWALLED,
)

#: container -> key text -> element: the table's whole content, as data.
Desired = dict[str, dict[str, Element]]


@dataclass(frozen=True)
class Layout:
    """What of the table depends on the configuration, not on the service ports."""

    config: PortalConfig

    @property
    def ip(self) -> str:
        return "ip6" if self.config.family.value == "IPv6" else "ip"

    @property
    def addr(self) -> str:
        return "ipv6_addr" if self.ip == "ip6" else "ipv4_addr"

    @property
    def loopback(self) -> str:
        return "::1" if self.ip == "ip6" else "127.0.0.0/8"

    def host_address(self) -> str:
        c = self.config
        return c.host_ip if c.wildcard else c.bind_address

    def containers(self) -> tuple[Set, ...]:
        addr, ip_port = self.addr, f"{self.addr} . inet_service"
        target = "inet_service" if self.config.wildcard else ip_port
        key = f"{addr} . inet_proto . inet_service"
        return (
            Set(PORTALS, key, target, comment="ClusterIP, LB IP and externalIP portals"),
            Set(PORTALS_RANGED, f"{key} . {addr}", target, flags=("interval",),
                comment="LB IP portals, for loadBalancerSourceRanges only"),
            Set(PORTALS_HOST, key, ip_port, comment="portals for the node's own traffic"),
            Set(PORTALS_HOST_LOCAL, key, ip_port,
                comment="externalIP portals for the node's own traffic, when they are its own"),
            Set(NODEPORTS, "inet_proto . inet_service", target, comment="NodePorts"),
            Set(NODEPORTS_HOST, "inet_proto . inet_service", ip_port,
                comment="NodePorts for the node's own traffic"),
            Set(NODEPORT_IPS, addr, flags=("interval",), comment="--nodeport-addresses"),
            Set(NODEPORT_HOST_IPS, addr, flags=("interval",),
                comment="--nodeport-addresses, loopback included"),
            Set(PROXY_PORTS, "inet_proto . inet_service", comment="every proxy port"),
            Set(REFUSED_PORTS, "inet_proto . inet_service",
                comment="proxy ports of service ports without endpoints"),
            Set(DROPPED_PORTS, "inet_proto . inet_service",
                comment="external proxy ports without a local endpoint"),
            Set(FIREWALLED, key, comment="LB IPs with loadBalancerSourceRanges"),
        )  # fmt: skip

    def rules(self) -> list[Rule]:
        ip, c = self.ip, self.config
        dest = f"{ip} daddr . meta l4proto . th dport"
        l4 = "meta l4proto { tcp, udp }"
        to = "redirect to :" if c.wildcard else f"dnat {ip} to"
        host = f"dnat {ip} to"
        cidrs = c.node_port_cidrs
        local = "fib daddr type local"
        if cidrs is None:
            container_nodeports = f"{local} {ip} daddr != {self.loopback}"
            host_nodeports = local
        else:
            container_nodeports = f"{local} {ip} daddr @{NODEPORT_IPS}"
            host_nodeports = f"{local} {ip} daddr @{NODEPORT_HOST_IPS}"
        return [
            Rule(NAT_PREROUTING, f"{l4} {to} {dest} . {ip} saddr map @{PORTALS_RANGED}"),
            Rule(NAT_PREROUTING, f"{l4} {to} {dest} map @{PORTALS}"),
            Rule(NAT_PREROUTING,
                 f"{container_nodeports} {l4} {to} meta l4proto . th dport map @{NODEPORTS}"),
            Rule(NAT_OUTPUT, f"{l4} {host} {dest} map @{PORTALS_HOST}"),
            Rule(NAT_OUTPUT, f"{local} {l4} {host} {dest} map @{PORTALS_HOST_LOCAL}"),
            Rule(NAT_OUTPUT,
                 f"{host_nodeports} {l4} {host} meta l4proto . th dport map @{NODEPORTS_HOST}"),
            Rule(FILTER_INPUT, f'iifname != "lo" ct status & dnat == 0 meta l4proto . th dport '
                               f"@{PROXY_PORTS} reject",
                 comment="refuse traffic to proxy ports that bypassed the portals"),
            Rule(FILTER_INPUT, f"meta l4proto . th dport @{REFUSED_PORTS} reject",
                 comment="service ports without endpoints"),
            Rule(FILTER_INPUT, f"meta l4proto . th dport @{DROPPED_PORTS} drop",
                 comment="externalTrafficPolicy Local without a local endpoint"),
            Rule(FILTER_INPUT, f"{dest} @{FIREWALLED} drop",
                 comment="LB IPs from outside loadBalancerSourceRanges"),
        ]  # fmt: skip

    def cidr_elements(self) -> list[Element]:
        cidrs = self.config.node_port_cidrs or ()
        out = [Element(NODEPORT_HOST_IPS, (c,)) for c in cidrs]
        out += [
            Element(NODEPORT_IPS, (c,))
            for c in cidrs
            if not ipaddress.ip_network(c, strict=False).is_loopback
        ]
        return out


def setup(tx: Transaction, layout: Layout, *, recreate_base: bool) -> None:
    """The table, its chains (flushed and refilled) and its sets and maps (created and
    flushed: the caller adds every element after)."""
    tx.add(Table(TABLE_COMMENT))
    if recreate_base:  # a changed hook, priority or map type must not fail the transaction
        for chain in BASE_CHAINS:
            tx.add(Chain(chain.name))
            tx.delete(Chain(chain.name))
        for container in layout.containers():
            tx.add(container)
            tx.delete(container)
    for chain in BASE_CHAINS:
        tx.add(chain)
        tx.flush(chain)
    for container in layout.containers():
        tx.add(container)
        tx.flush(container)
    for rule in layout.rules():
        tx.add(rule)
    for element in layout.cidr_elements():
        tx.add(element)


ElementKey = tuple[str, str]  # (set or map, key text)


class ElementBuilder:
    """The table's elements, kept up to date port by port: a sync looks at each served port
    once (a dict lookup) and computes elements only for ports that changed; what changed
    since the last write is kept in `delta` for a partial write.

    Two ports may claim one element (two Services with one externalIP and port): the first
    claimant's element is in force, the others wait in `_waiting` and the next takes over
    when it goes. Only clashes cost more than the element itself."""

    def __init__(self, config: PortalConfig) -> None:
        self.layout = Layout(config)
        #: Every element in force, by container and key: what a full write writes.
        self.desired: Desired = {name: {} for name in PORT_CONTAINERS}
        #: Per changed key since the last write: the element written before (None: none).
        self.delta: dict[ElementKey, Element | None] = {}
        self._ports: dict[PortalPort, tuple[Element, ...]] = {}
        self._waiting: dict[ElementKey, list[Element]] = {}

    def build(self, ports: Iterable[PortalPort]) -> Desired:
        family = self.layout.config.family
        previous, fresh = self._ports, {}
        added: list[tuple[Element, ...]] = []
        for entry in ports:
            if entry.port.family is not family:
                continue
            elements = previous.pop(entry, None)
            if elements is None:
                elements = tuple(port_elements(entry, self.layout))
                added.append(elements)
            fresh[entry] = elements
        for elements in previous.values():
            for element in elements:
                self._unclaim(element)
        for elements in added:
            for element in elements:
                self._claim(element)
        self._ports = fresh
        return self.desired

    def written(self) -> None:
        """The kernel holds `desired` now."""
        self.delta.clear()

    def _claim(self, element: Element) -> None:
        container, key = self.desired[element.container], element.key_text
        if key in container:
            self._waiting.setdefault((element.container, key), []).append(element)
            return
        self._note((element.container, key), None)
        container[key] = element

    def _unclaim(self, element: Element) -> None:
        container, key = self.desired[element.container], element.key_text
        ref = (element.container, key)
        waiting = self._waiting.get(ref)
        if container.get(key) is not element:  # a waiting claim goes
            if waiting is not None:
                waiting.remove(element)
                if not waiting:
                    del self._waiting[ref]
            return
        self._note(ref, element)
        if waiting:
            container[key] = waiting.pop(0)
            if not waiting:
                del self._waiting[ref]
        else:
            del container[key]

    def _note(self, ref: ElementKey, before: Element | None) -> None:
        self.delta.setdefault(ref, before)


def port_elements(entry: PortalPort, layout: Layout) -> list[Element]:
    port, config = entry.port, layout.config
    family = config.family
    if port.family is not family or not port.cluster_ip:
        return []
    proto, number = port.protocol.value.lower(), str(port.port)
    host = (layout.host_address(), str(entry.proxy_port))
    inside = _target(config, entry.proxy_port)
    outside = _target(config, entry.external_proxy_port or entry.proxy_port)
    out = [
        _map(PORTALS, (port.cluster_ip, proto, number), inside),
        _map(PORTALS_HOST, (port.cluster_ip, proto, number), host),
    ]
    for ip in port.load_balancer_ips_of(family):
        key = (ip, proto, number)
        if port.source_ranges:
            out += [_map(PORTALS_RANGED, (*key, src), outside) for src in port.source_ranges]
            out.append(Element(FIREWALLED, key))
        else:
            out.append(_map(PORTALS, key, outside))
        out.append(_map(PORTALS_HOST, key, host))
    for ip in port.external_ips_of(family):
        key = (ip, proto, number)
        out += [_map(PORTALS, key, outside), _map(PORTALS_HOST_LOCAL, key, host)]
    if port.node_port and entry.node_port_claimed:
        node_port = (proto, str(port.node_port))
        out += [_map(NODEPORTS, node_port, outside), _map(NODEPORTS_HOST, node_port, host)]
    out.append(Element(PROXY_PORTS, (proto, str(entry.proxy_port))))
    if entry.external_proxy_port:
        out.append(Element(PROXY_PORTS, (proto, str(entry.external_proxy_port))))
    if not entry.has_endpoints:
        out.append(Element(REFUSED_PORTS, (proto, str(entry.proxy_port))))
    if entry.external_proxy_port and not entry.has_local_endpoints:
        out.append(Element(DROPPED_PORTS, (proto, str(entry.external_proxy_port))))
    return out


def _target(config: PortalConfig, proxy_port: int) -> tuple[str, ...]:
    if config.wildcard:
        return (str(proxy_port),)
    return (config.bind_address, str(proxy_port))


def _map(container: str, key: tuple[str, ...], value: tuple[str, ...]) -> Element:
    return Element(container, key, value, is_map=True)
