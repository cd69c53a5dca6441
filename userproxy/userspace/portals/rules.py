"""The portal rules, as data. Pure.

From the served service ports and their proxy ports this builds the complete desired content of
every chain userproxy owns, in the shapes of kube-proxy's userspace mode (reference section 2):

  nat    KUBE-PORTALS-CONTAINER  <- PREROUTING (first)   ClusterIP / LB IP / externalIP
  nat    KUBE-PORTALS-HOST       <- OUTPUT (first)       the same, for processes on the node
  nat    KUBE-NODEPORT-CONTAINER <- PREROUTING (last, dst-type LOCAL)
  nat    KUBE-NODEPORT-HOST      <- OUTPUT (last, dst-type LOCAL)
  filter KUBE-NODEPORT-NON-LOCAL <- INPUT: accept new NodePort connections under default-deny
  filter KUBE-USERPROXY-FILTER   <- INPUT (first): ours, see below

Network facts behind the shapes:
- Portal jumps precede NodePort jumps: `--dst-type LOCAL` also matches load-balancer IPs that
  are routed locally, and a NodePort must not shadow a VIP.
- From PREROUTING, REDIRECT sends the packet to the primary address of the interface it came
  in on, so UDP replies un-NAT correctly; with a specific --bind-address we DNAT to it instead.
- From OUTPUT we always DNAT to the node IP: REDIRECT there goes to 127.0.0.1 and the replies
  leave from another address.
- NodePort rules in PREROUTING exclude 127.0.0.0/8: matching it there would let a neighbour
  reach localhost-bound NodePorts (the CVE-2020-8558 pattern). Localhost NodePorts are served
  from OUTPUT only, i.e. to processes on the node.
- KUBE-USERPROXY-FILTER (not in the old mode) refuses, with ICMP port-unreachable, traffic to a
  service port that has no endpoints (clients see "connection refused" at once; a TCP reset
  never reached the client after REDIRECT) and traffic from outside the node that reaches a
  proxy port without having been NATed by a portal (ctstate DNAT covers REDIRECT too), so
  proxy ports are not a back door to ClusterIP services.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from userproxy.iptables import rule as generic
from userproxy.iptables.rule import (
    ACCEPT,
    FILTER,
    NAT,
    REFUSE,
    Jump,
    JumpPlan,
    Rule,
    Ruleset,
    Target,
    safe_comment,
)
from userproxy.iptables.text import flush_text
from userproxy.model import Family, ServicePort

PORTALS_CONTAINER = "KUBE-PORTALS-CONTAINER"
PORTALS_HOST = "KUBE-PORTALS-HOST"
NODEPORT_CONTAINER = "KUBE-NODEPORT-CONTAINER"
NODEPORT_HOST = "KUBE-NODEPORT-HOST"
NODEPORT_NON_LOCAL = "KUBE-NODEPORT-NON-LOCAL"
USERPROXY_FILTER = "KUBE-USERPROXY-FILTER"

# Tables are written in this order, each in its own commit (iptables-restore commits per
# table). filter goes first: its REJECT rules for a new proxy port must be in place before a
# nat rule can send a client there, or a service without endpoints briefly accepts and resets.
CHAINS: dict[str, tuple[str, ...]] = {
    FILTER: (NODEPORT_NON_LOCAL, USERPROXY_FILTER),
    NAT: (PORTALS_CONTAINER, PORTALS_HOST, NODEPORT_CONTAINER, NODEPORT_HOST),
}
OWNED_CHAINS = frozenset(c for chains in CHAINS.values() for c in chains)

PORTAL_COMMENT = "handle ClusterIPs; NOTE: this must be before the NodePort rules"
NODEPORT_COMMENT = "handle service NodePorts; NOTE: this must be the last rule in the chain"
NON_LOCAL_COMMENT = "Ensure that non-local NodePort traffic can flow"
FILTER_COMMENT = "userproxy: refuse traffic to proxy ports that bypassed the portals"
LOOPBACK_NET = "127.0.0.0/8"
LOOPBACK_NET6 = "::1/128"
DROP = Target("DROP")
REFUSE6 = Target("REJECT", reject_with="icmp6-port-unreachable")


def _jump(table: str, chain: str, to: str, comment: str, *, first: bool) -> Jump:
    return Jump(table, chain, Rule(chain, Target(to), comment, addrtype_local=not first), first)


JUMPS: tuple[Jump, ...] = (
    _jump(NAT, "PREROUTING", PORTALS_CONTAINER, PORTAL_COMMENT, first=True),
    _jump(NAT, "OUTPUT", PORTALS_HOST, PORTAL_COMMENT, first=True),
    _jump(NAT, "PREROUTING", NODEPORT_CONTAINER, NODEPORT_COMMENT, first=False),
    _jump(NAT, "OUTPUT", NODEPORT_HOST, NODEPORT_COMMENT, first=False),
    _jump(FILTER, "INPUT", NODEPORT_NON_LOCAL, NON_LOCAL_COMMENT, first=True),
    # Listed after NON-LOCAL and also inserted first, so it ends up above it: the guard must
    # see a direct connection to a proxy port before NON-LOCAL would accept it.
    _jump(FILTER, "INPUT", USERPROXY_FILTER, FILTER_COMMENT, first=True),
)


@dataclass(frozen=True)
class PortalConfig:
    bind_address: str
    """`--bind-address`: 0.0.0.0 means REDIRECT from PREROUTING, else DNAT to this address."""

    host_ip: str
    """The node IP that OUTPUT rules DNAT to (the bind address when that is specific)."""

    nodeport_cidrs: tuple[str, ...] = ()
    """`--nodeport-addresses`: NodePorts answer only on these; empty means every local address."""

    family: Family = Family.IPv4
    """The family these rules are for: iptables writes IPv4, ip6tables IPv6."""

    @functools.cached_property
    def refuse(self) -> Target:
        """REJECT with the family's ICMP port-unreachable."""
        return REFUSE if self.family is Family.IPv4 else REFUSE6

    @functools.cached_property
    def loopback_net(self) -> str:
        return LOOPBACK_NET if self.family is Family.IPv4 else LOOPBACK_NET6

    @functools.cached_property
    def node_port_cidrs(self) -> tuple[str, ...] | None:
        """This family's `--nodeport-addresses` (None: every local address). If the flag
        lists only the other family's CIDRs, no address of this family answers NodePorts."""
        if not self.nodeport_cidrs:
            return None
        mine = Family.IPv6 if self.family is Family.IPv6 else Family.IPv4
        return tuple(c for c in self.nodeport_cidrs if Family.of(c) is mine)

    @functools.cached_property
    def wildcard(self) -> bool:
        return ipaddress.ip_address(self.bind_address).is_unspecified


@dataclass(frozen=True)
class PortalPort:
    """What the rule builder needs of one served service port."""

    port: ServicePort
    proxy_port: int
    has_endpoints: bool
    #: The NodePort is held by our socket; without that claim no NodePort rule is written.
    node_port_claimed: bool = False
    #: `externalTrafficPolicy: Local`: where traffic from outside the node goes (0: the
    #: proxy port), and whether this node has an endpoint for it (else it is dropped).
    external_proxy_port: int = 0
    has_local_endpoints: bool = True


class RuleBuilder:
    """Builds the desired rule set, sync after sync, reusing the rules of every service port
    that did not change (10,000 service ports would otherwise cost ~0.7 s of Python per sync)."""

    def __init__(self, config: PortalConfig) -> None:
        self.config = config
        self._rules: dict[PortalPort, tuple[Rule, ...]] = {}

    def build(self, ports: Iterable[PortalPort]) -> Ruleset:
        ruleset = Ruleset.of(CHAINS)
        fresh: dict[PortalPort, tuple[Rule, ...]] = {}
        proxy_ports: dict[str, list[int]] = {}
        for entry in ports:
            if entry.port.family is not self.config.family:
                continue
            rules = self._rules.get(entry)
            if rules is None:
                rules = tuple(port_rules(entry, self.config))
            fresh[entry] = rules
            for rule in rules:
                ruleset.add(rule)
            mine = proxy_ports.setdefault(entry.port.protocol.value.lower(), [])
            mine.append(entry.proxy_port)
            if entry.external_proxy_port:
                mine.append(entry.external_proxy_port)
        self._rules = fresh
        refuse = self.config.refuse
        guards = [
            rule
            for proto, nums in sorted(proxy_ports.items())
            for rule in guard_rules(proto, nums, refuse)
        ]
        ruleset.chains[FILTER][USERPROXY_FILTER][:0] = guards
        return ruleset


def build(ports: Iterable[PortalPort], config: PortalConfig) -> Ruleset:
    return RuleBuilder(config).build(ports)


def port_rules(entry: PortalPort, config: PortalConfig) -> list[Rule]:
    """Every rule of one service port, in the order the old proxier opened its portals
    (the proxy-port guard is shared, see `guard_rules`)."""
    port, proxy_port = entry.port, entry.proxy_port
    family = config.family
    if port.family is not family or not port.cluster_ip:
        return []  # the other family's rules are written by its own manager
    container = _container_target(config, proxy_port)
    # externalTrafficPolicy: Local: what arrives from outside goes to the external listener
    # (local endpoints only); the node's own traffic keeps the cluster-wide one, as upstream.
    external = container
    if entry.external_proxy_port:
        external = _container_target(config, entry.external_proxy_port)
    host = Target("DNAT", to_destination=family.address_port(_host_address(config), proxy_port))
    rules: list[Rule] = []
    dst = port.family.host_cidr(port.cluster_ip)
    rules += [
        _rule(PORTALS_CONTAINER, container, port, port.port, dst=dst),
        _rule(PORTALS_HOST, host, port, port.port, dst=dst),
    ]
    for ip in port.load_balancer_ips_of(family):
        dst = port.family.host_cidr(ip)
        for source in port.source_ranges or (None,):
            rules.append(_rule(PORTALS_CONTAINER, external, port, port.port, dst=dst, src=source))
        rules.append(_rule(PORTALS_HOST, host, port, port.port, dst=dst))
        if port.source_ranges:
            # From outside the ranges the portal does not take it, so it keeps the LB IP as
            # its destination: dropped here when that IP is the node's (a routed-through
            # LB IP is not dropped by the userspace mode; it is not served either).
            rules.append(_rule(USERPROXY_FILTER, DROP, port, port.port, dst=dst))
    for ip in port.external_ips_of(family):
        dst = port.family.host_cidr(ip)
        rules += [
            _rule(PORTALS_CONTAINER, external, port, port.port, dst=dst, physdev_not_in=True),
            _rule(PORTALS_CONTAINER, external, port, port.port, dst=dst, addrtype_local=True),
            _rule(PORTALS_HOST, host, port, port.port, dst=dst, addrtype_local=True),
        ]
    if port.node_port and entry.node_port_claimed:
        rules += _node_port_rules(entry, config, external, host)
    if not entry.has_endpoints:
        rules.append(_rule(USERPROXY_FILTER, config.refuse, port, proxy_port))
    if entry.external_proxy_port and not entry.has_local_endpoints:
        # No endpoint on this node: external traffic is dropped, not refused (upstream's
        # choice: the load balancer's health check moves traffic to other nodes).
        rules.append(_rule(USERPROXY_FILTER, DROP, port, entry.external_proxy_port))
    return rules


MULTIPORT_SLOTS = 15  # the kernel's xt_multiport limit; a range a:b takes two


def guard_rules(protocol: str, proxy_ports: Iterable[int], refuse: Target = REFUSE) -> list[Rule]:
    """Refuse connections to proxy ports that arrive from another host without having been
    NATed by a portal (ctstate DNAT covers REDIRECT too). Ports are packed into multiport
    rules, consecutive ones as ranges: one rule per proxy port would add 10,000 rules to a
    10,000-port node, and nft pays ~30 us per rule on every full sync."""
    rules: list[Rule] = []
    chunk: list[str] = []
    used = 0
    for low, high in _ranges(sorted(set(proxy_ports))):
        item, cost = (str(low), 1) if low == high else (f"{low}:{high}", 2)
        if used + cost > MULTIPORT_SLOTS:
            rules.append(_guard(protocol, chunk, refuse))
            chunk, used = [], 0
        chunk.append(item)
        used += cost
    if chunk:
        rules.append(_guard(protocol, chunk, refuse))
    return rules


def _guard(protocol: str, items: list[str], refuse: Target) -> Rule:
    return Rule(
        USERPROXY_FILTER,
        refuse,
        comment=FILTER_COMMENT,
        protocol=protocol,
        dports=",".join(items),
        not_in_interface="lo",
        ctstate_not_dnat=True,
    )


def _ranges(ports: list[int]) -> Iterator[tuple[int, int]]:
    start = prev = None
    for p in ports:
        if prev is not None and p == prev + 1:
            prev = p
            continue
        if start is not None and prev is not None:
            yield start, prev
        start = prev = p
    if start is not None and prev is not None:
        yield start, prev


def _rule(
    chain: str,
    target: Target,
    port: ServicePort,
    dport: int,
    *,
    dst: str | None = None,
    not_dst: str | None = None,
    not_in_interface: str | None = None,
    physdev_not_in: bool = False,
    addrtype_local: bool = False,
    ctstate_not_dnat: bool = False,
    state_new: bool = False,
    src: str | None = None,
) -> Rule:
    return Rule(
        chain,
        target,
        comment=safe_comment(str(port.name)),
        protocol=port.protocol.value.lower(),
        dport=dport,
        dst=dst,
        not_dst=not_dst,
        not_in_interface=not_in_interface,
        physdev_not_in=physdev_not_in,
        addrtype_local=addrtype_local,
        ctstate_not_dnat=ctstate_not_dnat,
        state_new=state_new,
        matches=("-s", src) if src else (),
    )


def _node_port_rules(
    entry: PortalPort, config: PortalConfig, container: Target, host: Target
) -> list[Rule]:
    port = entry.port
    rules: list[Rule] = []
    cidrs = config.node_port_cidrs
    for cidr in (None,) if cidrs is None else cidrs:
        if cidr is None:
            loopback = config.loopback_net
            rules.append(
                _rule(NODEPORT_CONTAINER, container, port, port.node_port, not_dst=loopback)
            )
        elif not ipaddress.ip_network(cidr).is_loopback:
            rules.append(_rule(NODEPORT_CONTAINER, container, port, port.node_port, dst=cidr))
        rules.append(_rule(NODEPORT_HOST, host, port, port.node_port, dst=cidr))
    accepted = entry.external_proxy_port or entry.proxy_port
    rules.append(_rule(NODEPORT_NON_LOCAL, ACCEPT, port, accepted, state_new=True))
    return rules


def _container_target(config: PortalConfig, proxy_port: int) -> Target:
    if config.wildcard:
        return Target("REDIRECT", to_ports=proxy_port)
    return Target(
        "DNAT", to_destination=config.family.address_port(config.bind_address, proxy_port)
    )


def _host_address(config: PortalConfig) -> str:
    return config.host_ip if config.wildcard else config.bind_address


def plan_jumps(
    present: Mapping[tuple[str, str], Sequence[str]], jumps: Sequence[Jump] = JUMPS
) -> JumpPlan:
    """The portal jumps' repair plan (see `iptables.rule.plan_jumps`)."""
    return generic.plan_jumps(present, jumps)


#: A batch that makes the portal chains exactly a ruleset (see `iptables.text.flush_text`).
restore_text = flush_text
