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

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from userproxy.model import ServicePort

NAT, FILTER = "nat", "filter"
PORTALS_CONTAINER = "KUBE-PORTALS-CONTAINER"
PORTALS_HOST = "KUBE-PORTALS-HOST"
NODEPORT_CONTAINER = "KUBE-NODEPORT-CONTAINER"
NODEPORT_HOST = "KUBE-NODEPORT-HOST"
NODEPORT_NON_LOCAL = "KUBE-NODEPORT-NON-LOCAL"
USERPROXY_FILTER = "KUBE-USERPROXY-FILTER"

CHAINS: dict[str, tuple[str, ...]] = {
    NAT: (PORTALS_CONTAINER, PORTALS_HOST, NODEPORT_CONTAINER, NODEPORT_HOST),
    FILTER: (NODEPORT_NON_LOCAL, USERPROXY_FILTER),
}
OWNED_CHAINS = frozenset(c for chains in CHAINS.values() for c in chains)

PORTAL_COMMENT = "handle ClusterIPs; NOTE: this must be before the NodePort rules"
NODEPORT_COMMENT = "handle service NodePorts; NOTE: this must be the last rule in the chain"
NON_LOCAL_COMMENT = "Ensure that non-local NodePort traffic can flow"
FILTER_COMMENT = "userproxy: refuse traffic to proxy ports that bypassed the portals"
LOOPBACK_NET = "127.0.0.0/8"


@dataclass(frozen=True)
class Target:
    name: str
    to_ports: int | None = None
    to_destination: str | None = None
    reject_with: str | None = None

    def args(self) -> list[str]:
        a = ["-j", self.name]
        if self.to_ports is not None:
            a += ["--to-ports", str(self.to_ports)]
        if self.to_destination is not None:
            a += ["--to-destination", self.to_destination]
        if self.reject_with is not None:
            a += ["--reject-with", self.reject_with]
        return a


ACCEPT = Target("ACCEPT")
REFUSE = Target("REJECT", reject_with="icmp-port-unreachable")


@dataclass(frozen=True)
class Rule:
    chain: str
    target: Target
    comment: str | None = None
    protocol: str | None = None
    dport: int | None = None
    dst: str | None = None
    not_dst: str | None = None
    not_in_interface: str | None = None
    physdev_not_in: bool = False
    addrtype_local: bool = False
    ctstate_not_dnat: bool = False
    state_new: bool = False

    def args(self) -> list[str]:
        """The rule as iptables arguments (without `-A CHAIN`), in kube-proxy's order."""
        a: list[str] = []
        if self.comment is not None:
            a += ["-m", "comment", "--comment", self.comment]
        if self.protocol is not None:
            a += ["-p", self.protocol, "-m", self.protocol]
            if self.dport is not None:
                a += ["--dport", str(self.dport)]
        if self.dst is not None:
            a += ["-d", self.dst]
        if self.not_dst is not None:
            a += ["!", "-d", self.not_dst]
        if self.not_in_interface is not None:
            a += ["!", "-i", self.not_in_interface]
        if self.physdev_not_in:
            a += ["-m", "physdev", "!", "--physdev-is-in"]
        if self.addrtype_local:
            a += ["-m", "addrtype", "--dst-type", "LOCAL"]
        if self.ctstate_not_dnat:
            a += ["-m", "conntrack", "!", "--ctstate", "DNAT"]
        if self.state_new:
            a += ["-m", "state", "--state", "NEW"]
        return a + self.target.args()

    def line(self) -> str:
        """`-A CHAIN args` as iptables-restore reads it (comments quoted)."""
        return " ".join(["-A", self.chain, *(_quote(x) for x in self.args())])


def _quote(arg: str) -> str:
    return f'"{arg}"' if any(c in arg for c in ' ;"') or arg == "" else arg


@dataclass(frozen=True)
class Jump:
    """A rule in a built-in chain that sends traffic into one of ours."""

    table: str
    chain: str
    rule: Rule
    first: bool  # inserted at the top (True) or appended (False)


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

    @property
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


@dataclass
class Ruleset:
    chains: dict[str, dict[str, list[Rule]]] = field(
        default_factory=lambda: {table: {c: [] for c in chains} for table, chains in CHAINS.items()}
    )

    def add(self, rule: Rule) -> None:
        table = NAT if rule.chain in CHAINS[NAT] else FILTER
        self.chains[table][rule.chain].append(rule)

    def rules(self, chain: str) -> list[Rule]:
        table = NAT if chain in CHAINS[NAT] else FILTER
        return self.chains[table][chain]

    def __len__(self) -> int:
        return sum(len(r) for chains in self.chains.values() for r in chains.values())


def build(ports: Iterable[PortalPort], config: PortalConfig) -> Ruleset:
    ruleset = Ruleset()
    for entry in ports:
        for rule in port_rules(entry, config):
            ruleset.add(rule)
    return ruleset


def port_rules(entry: PortalPort, config: PortalConfig) -> list[Rule]:
    """Every rule of one service port, in the order the old proxier opened its portals."""
    port, proxy_port = entry.port, entry.proxy_port
    if not _ipv4(port.cluster_ip):
        return []  # the portal tables are IPv4 (iptables); IPv6 services are proxied only
    container = _container_target(config, proxy_port)
    host = Target("DNAT", to_destination=f"{_host_address(config)}:{proxy_port}")
    rules: list[Rule] = []
    for ip in (port.cluster_ip, *port.load_balancer_ips):
        if _ipv4(ip):
            rules += [
                _rule(PORTALS_CONTAINER, container, port, port.port, dst=f"{ip}/32"),
                _rule(PORTALS_HOST, host, port, port.port, dst=f"{ip}/32"),
            ]
    for ip in filter(_ipv4, port.external_ips):
        dst = f"{ip}/32"
        rules += [
            _rule(PORTALS_CONTAINER, container, port, port.port, dst=dst, physdev_not_in=True),
            _rule(PORTALS_CONTAINER, container, port, port.port, dst=dst, addrtype_local=True),
            _rule(PORTALS_HOST, host, port, port.port, dst=dst, addrtype_local=True),
        ]
    if port.node_port and entry.node_port_claimed:
        rules += _node_port_rules(entry, config, container, host)
    rules.append(
        _rule(
            USERPROXY_FILTER, REFUSE, port, proxy_port, not_in_interface="lo", ctstate_not_dnat=True
        )
    )
    if not entry.has_endpoints:
        rules.append(_rule(USERPROXY_FILTER, REFUSE, port, proxy_port))
    return rules


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
) -> Rule:
    return Rule(
        chain,
        target,
        comment=str(port.name),
        protocol=port.protocol.value.lower(),
        dport=dport,
        dst=dst,
        not_dst=not_dst,
        not_in_interface=not_in_interface,
        physdev_not_in=physdev_not_in,
        addrtype_local=addrtype_local,
        ctstate_not_dnat=ctstate_not_dnat,
        state_new=state_new,
    )


def _node_port_rules(
    entry: PortalPort, config: PortalConfig, container: Target, host: Target
) -> list[Rule]:
    port = entry.port
    rules: list[Rule] = []
    for cidr in config.nodeport_cidrs or (None,):
        if cidr is None:
            rules.append(
                _rule(NODEPORT_CONTAINER, container, port, port.node_port, not_dst=LOOPBACK_NET)
            )
        elif not ipaddress.ip_network(cidr).is_loopback:
            rules.append(_rule(NODEPORT_CONTAINER, container, port, port.node_port, dst=cidr))
        rules.append(_rule(NODEPORT_HOST, host, port, port.node_port, dst=cidr))
    rules.append(_rule(NODEPORT_NON_LOCAL, ACCEPT, port, entry.proxy_port, state_new=True))
    return rules


def _container_target(config: PortalConfig, proxy_port: int) -> Target:
    if config.wildcard:
        return Target("REDIRECT", to_ports=proxy_port)
    return Target("DNAT", to_destination=f"{config.bind_address}:{proxy_port}")


def _host_address(config: PortalConfig) -> str:
    return config.host_ip if config.wildcard else config.bind_address


def _ipv4(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).version == 4
    except ValueError:
        return False


def restore_text(ruleset: Ruleset, *, missing_jumps: Sequence[Jump] = ()) -> str:
    """An `iptables-restore --noflush` batch that makes our chains exactly `ruleset`.

    Declaring a chain (`:NAME - [0:0]`) flushes it (creating it if needed); chains we do not
    declare, including the built-in ones and everyone else's, are left alone. The kernel
    applies the whole batch or nothing.
    """
    out: list[str] = []
    for table, chains in ruleset.chains.items():
        out.append(f"*{table}")
        out += [f":{chain} - [0:0]" for chain in chains]
        for rules in chains.values():
            out += [r.line() for r in rules]
        for jump in missing_jumps:
            if jump.table == table:
                verb = f"-I {jump.chain} 1" if jump.first else f"-A {jump.chain}"
                out.append(jump.rule.line().replace(f"-A {jump.chain}", verb, 1))
        out.append("COMMIT")
    return "\n".join(out) + "\n"
