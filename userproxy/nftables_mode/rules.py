"""The rules of `--proxy-mode nftables`: the kernel moves the traffic. Pure.

kube-proxy's nftables-mode layout (pkg/proxy/nftables), in a table of userproxy's own (`ip
userproxy`, `ip6 userproxy`) so it never touches a real kube-proxy's `kube-proxy` table:

  base chains   filter-prerouting/-input/-forward/-output at dstnat-10 (they see the service
                address before DNAT), filter-output-post-dnat at dstnat+10, nat-prerouting and
                nat-output at dstnat, nat-postrouting at srcnat
  dispatch      services: `daddr . l4proto . dport vmap @service-ips`, then NodePorts on local
                addresses (`fib daddr type local`, or @nodeport-ips) `vmap @service-nodeports`
  per port      service-<hash>-ns/name/proto/port    `numgen random mod N vmap {...}` over
                                                     endpoint chains (affinity sets first);
                                                     up to 8 endpoints a cascade of `numgen`
                                                     rules instead (see CASCADE_MAX)
                external-<hash>-...                  external destinations: masquerade, then
                                                     the cluster chain, or the local one
                                                     under `externalTrafficPolicy: Local`
                local-<hash>-...                     this node's endpoints only
                firewall-<hash>-...                  `loadBalancerSourceRanges`: drop others
                endpoint-<hash>-...__ip/port         hairpin masquerade, [affinity], DNAT
                affinity-<hash>-...                  a dynamic set of client addresses with
                                                     the affinity timeout
  no endpoints  @no-endpoint-services / @no-endpoint-nodeports: `goto reject-chain` (nothing
                anywhere) or `drop` (none on this node where a Local policy asks for one)
  masquerading  mark-for-masquerade sets 0x4000; nat-postrouting masquerades marked packets

Each service port's chains, affinity sets and map elements form a `ServicePlan`; the provider
diffs plans to write only what changed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from userproxy.model import Endpoint, Family, ServicePort
from userproxy.nftables.transaction import (
    BaseChain,
    Chain,
    Element,
    NftFamily,
    Rule,
    Set,
    Table,
    Transaction,
)

TABLE = "userproxy"
TABLE_COMMENT = "rules for userproxy --proxy-mode nftables"
MASQ_BIT = 0x4000
#: The netfilter priority of DNAT (`dstnat`) and SNAT (`srcnat`).
DSTNAT = -100
SRCNAT = 100

FILTER_PREROUTING = "filter-prerouting"
FILTER_INPUT = "filter-input"
FILTER_FORWARD = "filter-forward"
FILTER_OUTPUT = "filter-output"
FILTER_OUTPUT_POST_DNAT = "filter-output-post-dnat"
NAT_PREROUTING = "nat-prerouting"
NAT_OUTPUT = "nat-output"
NAT_POSTROUTING = "nat-postrouting"

SERVICES = "services"
MASQUERADING = "masquerading"
MARK_MASQ = "mark-for-masquerade"
REJECT_CHAIN = "reject-chain"
SERVICE_ENDPOINTS_CHECK = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
FIREWALL_CHECK = "firewall-check"
CLUSTER_IPS_CHECK = "cluster-ips-check"

CLUSTER_IPS = "cluster-ips"
NODEPORT_IPS = "nodeport-ips"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
FIREWALL_IPS = "firewall-ips"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
#: The maps and sets whose elements come from the service ports.
ELEMENT_CONTAINERS = (
    CLUSTER_IPS,
    NO_ENDPOINT_SERVICES,
    NO_ENDPOINT_NODEPORTS,
    FIREWALL_IPS,
    SERVICE_IPS,
    SERVICE_NODEPORTS,
)

BASE_CHAINS: tuple[Chain, ...] = (
    Chain(FILTER_PREROUTING, BaseChain("filter", "prerouting", DSTNAT - 10)),
    Chain(FILTER_INPUT, BaseChain("filter", "input", DSTNAT - 10)),
    Chain(FILTER_FORWARD, BaseChain("filter", "forward", DSTNAT - 10)),
    Chain(FILTER_OUTPUT, BaseChain("filter", "output", DSTNAT - 10)),
    Chain(FILTER_OUTPUT_POST_DNAT, BaseChain("filter", "output", DSTNAT + 10)),
    Chain(NAT_PREROUTING, BaseChain("nat", "prerouting", DSTNAT)),
    Chain(NAT_OUTPUT, BaseChain("nat", "output", DSTNAT)),
    Chain(NAT_POSTROUTING, BaseChain("nat", "postrouting", SRCNAT)),
)

#: (from base chain, condition, to chain), in kube-proxy's order. Rejecting is only valid in
#: the input, forward and output hooks on older kernels, hence no endpoints check in
#: prerouting.
JUMPS: tuple[tuple[str, str, str], ...] = (
    (FILTER_INPUT, "ct state new", NODEPORT_ENDPOINTS_CHECK),
    (FILTER_INPUT, "ct state new", SERVICE_ENDPOINTS_CHECK),
    (FILTER_FORWARD, "ct state new", SERVICE_ENDPOINTS_CHECK),
    (FILTER_OUTPUT, "ct state new", SERVICE_ENDPOINTS_CHECK),
    (FILTER_PREROUTING, "ct state new", FIREWALL_CHECK),
    (FILTER_OUTPUT, "ct state new", FIREWALL_CHECK),
    (NAT_OUTPUT, "", SERVICES),
    (NAT_PREROUTING, "", SERVICES),
    (NAT_POSTROUTING, "", MASQUERADING),
    (FILTER_FORWARD, "ct state new", CLUSTER_IPS_CHECK),
    (FILTER_OUTPUT_POST_DNAT, "ct state new", CLUSTER_IPS_CHECK),
)
FIXED_CHAINS = (
    NODEPORT_ENDPOINTS_CHECK,
    SERVICE_ENDPOINTS_CHECK,
    FIREWALL_CHECK,
    SERVICES,
    MASQUERADING,
    CLUSTER_IPS_CHECK,
    MARK_MASQ,
    REJECT_CHAIN,
)
SERVICE_CHAIN_PREFIXES = ("service-", "external-", "local-", "firewall-", "endpoint-")
AFFINITY_PREFIX = "affinity-"
#: nftables names are at most 256 bytes; kube-proxy keeps 16 for its prefixes.
NAME_BASE_MAX = 256 - 16
#: Up to this many endpoints, a service chain picks one with a cascade of `numgen` rules
#: rather than an anonymous verdict map. Every anonymous map is a set the kernel looks up
#: through the whole transaction when it is created, so a full sync of 10,000 services with
#: one map each is quadratic (over 30 s here; 3,000 took 1.7 s); rules cost nothing of that
#: and a new connection walks at most this many of them.
CASCADE_MAX = 8


@dataclass(frozen=True)
class NftConfig:
    family: Family = Family.IPv4
    masquerade_all: bool = False
    """`iptables.masqueradeAll`: SNAT all service traffic, not only external and hairpin."""
    nodeport_cidrs: tuple[str, ...] | None = None
    """This family's `--nodeport-addresses` (None: every local address but loopback)."""

    @property
    def nft_family(self) -> NftFamily:
        return NftFamily.of(self.family)

    @property
    def ip(self) -> str:
        """The payload keyword of this family's header: `ip` or `ip6`."""
        return "ip6" if self.family is Family.IPv6 else "ip"

    @property
    def addr_type(self) -> str:
        return "ipv6_addr" if self.family is Family.IPv6 else "ipv4_addr"

    @property
    def not_loopback(self) -> str:
        return "ip6 daddr != ::1" if self.family is Family.IPv6 else "ip daddr != 127.0.0.0/8"


@dataclass(frozen=True)
class Backed:
    """A service port and the endpoints that serve it, as seen from this node."""

    port: ServicePort
    #: Every usable endpoint (topology hints applied): what `Cluster` policies spread over.
    cluster: tuple[Endpoint, ...]
    #: Those on this node: what `Local` policies spread over.
    local: tuple[Endpoint, ...] = ()


@dataclass(frozen=True)
class ServicePlan:
    """Everything one service port owns in the table."""

    chains: tuple[tuple[str, tuple[Rule, ...]], ...] = ()
    sets: tuple[Set, ...] = ()
    elements: tuple[Element, ...] = ()


def _hash_name(text: str) -> str:
    """kube-proxy's chain-name base: 8 characters of base32(sha256) then the readable name
    (the hash keeps names unique if they are ever cut, and tells similar names apart)."""
    digest = _base32_40(hashlib.sha256(text.encode()).digest()[:5])
    name = f"{digest}-{text}"
    return name if len(name) <= NAME_BASE_MAX else name[: NAME_BASE_MAX - 3] + "..."


_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def _base32_40(five: bytes) -> str:
    """The base32 encoding of 5 bytes (40 bits, 8 characters: the first 8 of the whole
    digest's encoding); the standard library's encoder is pure Python, 8 us a call."""
    bits = int.from_bytes(five, "big")
    return "".join(_B32[(bits >> shift) & 31] for shift in range(35, -5, -5))


def port_base(port: ServicePort) -> str:
    n = port.name
    return _hash_name(f"{n.namespace}/{n.name}/{n.protocol.value.lower()}/{n.port}")


def endpoint_base(port: ServicePort, endpoint: Endpoint) -> str:
    n = port.name
    ip = endpoint.ip.replace(":", ".")  # colons are not allowed in chain names
    return _hash_name(
        f"{n.namespace}/{n.name}/{n.protocol.value.lower()}/{n.port}__{ip}/{endpoint.port}"
    )


def service_chain(port: ServicePort) -> str:
    return "service-" + port_base(port)


def external_chain(port: ServicePort) -> str:
    return "external-" + port_base(port)


def local_chain(port: ServicePort) -> str:
    return "local-" + port_base(port)


def firewall_chain(port: ServicePort) -> str:
    return "firewall-" + port_base(port)


def endpoint_chain(port: ServicePort, endpoint: Endpoint) -> str:
    return "endpoint-" + endpoint_base(port, endpoint)


def affinity_set(port: ServicePort, endpoint: Endpoint) -> str:
    return AFFINITY_PREFIX + endpoint_base(port, endpoint)


def is_service_chain(name: str) -> bool:
    """Per-service chains always hold a "/"; the fixed ones never do."""
    return "/" in name


# ---------------------------------------------------------------------- the fixed layout
def setup(tx: Transaction, config: NftConfig, *, recreate_base: bool) -> None:
    """The table, its base and fixed chains (flushed and refilled), and its sets and maps
    (created, flushed: a full sync then adds every element). `recreate_base` deletes the
    base chains first, so a changed hook or priority from an older version cannot make the
    transaction fail (once per process, as kube-proxy)."""
    ip, addr = config.ip, config.addr_type
    tx.add(Table(TABLE_COMMENT))
    if recreate_base:
        for chain in BASE_CHAINS:
            tx.add(Chain(chain.name))
            tx.delete(Chain(chain.name))
    for chain in BASE_CHAINS:
        tx.add(chain)
        tx.flush(chain)
    for name in FIXED_CHAINS:
        tx.add(Chain(name))
        tx.flush(Chain(name))
    for source, condition, target in JUMPS:
        tx.add(Rule(source, f"{condition} jump {target}".strip()))
    mark = hex(MASQ_BIT)
    tx.add(Rule(MARK_MASQ, f"meta mark set meta mark or {mark}"))
    tx.add(Rule(MASQUERADING, f"meta mark & {mark} == 0 return"))
    tx.add(Rule(MASQUERADING, f"meta mark set meta mark xor {mark}"))
    tx.add(Rule(MASQUERADING, "masquerade fully-random"))
    tx.add(Rule(REJECT_CHAIN, "reject"))
    containers = (
        Set(CLUSTER_IPS, addr, comment="Active ClusterIPs"),
        Set(NO_ENDPOINT_SERVICES, f"{addr} . inet_proto . inet_service", "verdict",
            comment="vmap to drop or reject packets to services with no endpoints"),
        Set(NO_ENDPOINT_NODEPORTS, "inet_proto . inet_service", "verdict",
            comment="vmap to drop or reject packets to service nodeports with no endpoints"),
        Set(FIREWALL_IPS, f"{addr} . inet_proto . inet_service", "verdict",
            comment="destinations that are subject to LoadBalancerSourceRanges"),
        Set(SERVICE_IPS, f"{addr} . inet_proto . inet_service", "verdict",
            comment="ClusterIP, ExternalIP and LoadBalancer IP traffic"),
        Set(SERVICE_NODEPORTS, "inet_proto . inet_service", "verdict",
            comment="NodePort traffic"),
    )  # fmt: skip
    for container in containers:
        tx.add(container)
        tx.flush(container)
    nodeport_ips = Set(NODEPORT_IPS, addr, flags=("interval",),
                       comment="IPs that accept NodePort traffic")  # fmt: skip
    tx.add(nodeport_ips)
    tx.flush(nodeport_ips)
    cidrs = config.nodeport_cidrs
    for cidr in cidrs or ():
        tx.add(Element(NODEPORT_IPS, (cidr,)))
    tx.add(Rule(CLUSTER_IPS_CHECK, f"{ip} daddr @{CLUSTER_IPS} reject",
                comment="Reject traffic to invalid ports of ClusterIPs"))  # fmt: skip
    tx.add(Rule(SERVICE_ENDPOINTS_CHECK,
                f"{ip} daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}"))  # fmt: skip
    tx.add(Rule(FIREWALL_CHECK, f"{ip} daddr . meta l4proto . th dport vmap @{FIREWALL_IPS}"))
    tx.add(Rule(SERVICES, f"{ip} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}"))
    # NodePorts answer on local addresses only; loopback never (pods cannot reach it, and a
    # neighbour must not reach the node's localhost listeners: CVE-2020-8558).
    where = (
        f"fib daddr type local {config.not_loopback}"
        if cidrs is None
        else f"fib daddr type local {ip} daddr @{NODEPORT_IPS} {config.not_loopback}"
    )
    tx.add(Rule(NODEPORT_ENDPOINTS_CHECK,
                f"{where} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}"))  # fmt: skip
    tx.add(Rule(SERVICES, f"{where} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}"))


# ---------------------------------------------------------------------- one service port
def plan(entry: Backed, config: NftConfig) -> ServicePlan:
    """The chains, affinity sets and map elements of one service port (nothing for a port
    of the other family: its own table holds it)."""
    port = entry.port
    if port.family is not config.family or not port.cluster_ip:
        return ServicePlan()
    return _Planner(entry, config).build()


class _Planner:
    def __init__(self, entry: Backed, config: NftConfig) -> None:
        self.entry = entry
        self.port = entry.port
        self.config = config
        self.chains: dict[str, list[Rule]] = {}
        self.sets: list[Set] = []
        self.elements: list[Element] = []
        self.proto = self.port.protocol.value.lower()
        #: Each endpoint's name base, hashed once.
        self._bases: dict[Endpoint, str] = {}

    def _base(self, endpoint: Endpoint) -> str:
        base = self._bases.get(endpoint)
        if base is None:
            base = self._bases[endpoint] = endpoint_base(self.port, endpoint)
        return base

    def build(self) -> ServicePlan:
        port, entry, config = self.port, self.entry, self.config
        family = config.family
        cluster, local = entry.cluster, entry.local
        has_endpoints = bool(cluster) or bool(local)
        base = port_base(port)
        cluster_chain, local_chain_name = "service-" + base, "local-" + base
        ext, firewall = "external-" + base, "firewall-" + base
        uses_local = bool(local) and (port.internal_local or port.external_local_in_force)
        internal_chain = local_chain_name if port.internal_local else cluster_chain
        has_internal = bool(local) if port.internal_local else bool(cluster)
        external_policy = local_chain_name if port.external_local_in_force else cluster_chain
        has_external = bool(local) if port.external_local_in_force else bool(cluster)
        lb_ips = port.load_balancer_ips_of(family)
        externally_reachable = bool(port.node_port or port.external_ips_of(family) or lb_ips)
        uses_external = has_endpoints and externally_reachable
        uses_firewall = bool(lb_ips) and bool(port.source_ranges)
        no_internal = "drop" if has_endpoints else f"goto {REJECT_CHAIN}"
        no_external = "drop" if has_endpoints else f"goto {REJECT_CHAIN}"

        self._set_element(CLUSTER_IPS, (port.cluster_ip,))
        key = (port.cluster_ip, self.proto, str(port.port))
        if has_internal:
            self._map_element(SERVICE_IPS, key, f"goto {internal_chain}")
        else:
            self._map_element(NO_ENDPOINT_SERVICES, key, no_internal)
        for ip in (*port.external_ips_of(family), *lb_ips):
            key = (ip, self.proto, str(port.port))
            if uses_external:
                self._map_element(SERVICE_IPS, key, f"goto {ext}")
            if not has_external:
                self._map_element(NO_ENDPOINT_SERVICES, key, no_external)
            if uses_firewall and ip in lb_ips:
                self._map_element(FIREWALL_IPS, key, f"goto {firewall}")
        if port.node_port:
            nodeport_key = (self.proto, str(port.node_port))
            if uses_external:
                self._map_element(SERVICE_NODEPORTS, nodeport_key, f"goto {ext}")
            if not has_external:
                self._map_element(NO_ENDPOINT_NODEPORTS, nodeport_key, no_external)

        if cluster:
            self._spread(cluster_chain, cluster)
            if has_internal and internal_chain == cluster_chain:
                self._internal_masquerade(cluster_chain)
        if uses_local:
            self._spread(local_chain_name, local)
            if has_internal and internal_chain == local_chain_name:
                self._internal_masquerade(local_chain_name)
        if uses_external:
            self._external(ext, cluster_chain if cluster else None,
                           external_policy if has_external else None)  # fmt: skip
        if uses_firewall:
            sources = ", ".join(port.source_ranges)
            self.chains[firewall] = [Rule(firewall, f"{config.ip} saddr != {{ {sources} }} drop")]
        reachable = sorted(set(cluster) | (set(local) if uses_local else set()))
        for endpoint in reachable:
            self._endpoint(endpoint)
        return ServicePlan(
            chains=tuple((name, tuple(rules)) for name, rules in self.chains.items()),
            sets=tuple(self.sets),
            elements=tuple(self.elements),
        )

    def _set_element(self, container: str, key: tuple[str, ...]) -> None:
        self.elements.append(Element(container, key))

    def _map_element(self, container: str, key: tuple[str, ...], verdict: str) -> None:
        self.elements.append(Element(container, key, (verdict,), is_map=True))

    def _internal_masquerade(self, chain: str) -> None:
        """With masqueradeAll, ClusterIP traffic is SNATed too (first rule of the chain)."""
        if self.config.masquerade_all:
            port = self.port
            rule = (f"{self.config.ip} daddr {port.cluster_ip} {self.proto} dport {port.port} "
                    f"jump {MARK_MASQ}")  # fmt: skip
            self.chains[chain].insert(0, Rule(chain, rule))

    def _spread(self, chain: str, endpoints: tuple[Endpoint, ...]) -> None:
        """Affinity first (a client remembered for an endpoint goes back there), then a
        random pick among the endpoints."""
        rules: list[Rule] = []
        if self.port.affinity.client_ip:
            for ep in endpoints:
                base = self._base(ep)
                rules.append(Rule(chain, f"{self.config.ip} saddr @{AFFINITY_PREFIX}{base} "
                                         f"goto endpoint-{base}"))  # fmt: skip
        targets = ["endpoint-" + self._base(ep) for ep in endpoints]
        n = len(targets)
        if n <= CASCADE_MAX:
            # Endpoint i is taken with probability 1/(n-i) if none before it was: uniform.
            rules += [
                Rule(chain, f"numgen random mod {n - i} == 0 goto {target}")
                for i, target in enumerate(targets[:-1])
            ]
            rules.append(Rule(chain, f"goto {targets[-1]}"))
        else:
            choices = ", ".join(f"{i} : goto {target}" for i, target in enumerate(targets))
            rules.append(Rule(chain, f"numgen random mod {n} vmap {{ {choices} }}"))
        self.chains[chain] = rules

    def _external(self, chain: str, cluster_chain: str | None, policy: str | None) -> None:
        rules: list[Rule] = []
        if not self.port.external_local_in_force:
            # Cluster policy: the endpoint may be on another node, whose reply must come back
            # through this one.
            rules.append(Rule(chain, f"jump {MARK_MASQ}"))
        elif cluster_chain is not None:
            # The node's own traffic to an external destination is not subject to the Local
            # policy: its source is a local address, masqueraded, served cluster-wide.
            rules.append(Rule(chain, f"fib saddr type local jump {MARK_MASQ}",
                              comment="masquerade local traffic"))  # fmt: skip
            rules.append(Rule(chain, f"fib saddr type local goto {cluster_chain}",
                              comment="short-circuit local traffic"))  # fmt: skip
        if policy is not None:
            rules.append(Rule(chain, f"goto {policy}"))
        self.chains[chain] = rules

    def _endpoint(self, endpoint: Endpoint) -> None:
        port, ip = self.port, self.config.ip
        base = self._base(endpoint)
        chain = "endpoint-" + base
        rules = [Rule(chain, f"{ip} saddr {endpoint.ip} jump {MARK_MASQ}")]
        if port.affinity.client_ip:
            name = AFFINITY_PREFIX + base
            timeout = port.affinity.timeout_s
            flags = ("dynamic", "timeout")
            self.sets.append(Set(name, self.config.addr_type, flags=flags, timeout_s=timeout))
            rules.append(Rule(chain, f"update @{name} {{ {ip} saddr }}"))
        target = self.config.family.address_port(endpoint.ip, endpoint.port)
        rules.append(Rule(chain, f"meta l4proto {self.proto} dnat to {target}"))
        self.chains[chain] = rules
