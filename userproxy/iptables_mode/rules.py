"""The rules of `--proxy-mode iptables`: the kernel moves the traffic. Pure.

kube-proxy's iptables-mode layout, built from the same service ports and endpoints as the
userspace mode:

  nat    PREROUTING, OUTPUT -> KUBE-SERVICES
             ClusterIP / externalIP / LoadBalancer IP -> KUBE-SVC-<hash>
             last: dst-type LOCAL -> KUBE-NODEPORTS -> KUBE-MARK-MASQ, KUBE-SVC-<hash>
         KUBE-SVC-<hash>   (affinity: `recent` checks first) then one rule per endpoint with
                           `statistic --probability 1/n, 1/(n-1), ...`, the last unconditional
         KUBE-SEP-<hash>   hairpin (-s endpoint) -> KUBE-MARK-MASQ; [recent --set;] DNAT
         KUBE-MARK-MASQ    MARK --or-mark 0x4000
         POSTROUTING -> KUBE-POSTROUTING: marked traffic is MASQUERADEd (replies come back
                           through this node: external clients of NodePorts, hairpin)
  filter FORWARD, OUTPUT (ctstate NEW) -> KUBE-SERVICES: REJECT service IPs with no endpoints
         INPUT (ctstate NEW) -> KUBE-EXTERNAL-SERVICES: REJECT NodePorts with no endpoints
         FORWARD -> KUBE-FORWARD: accept marked and established service traffic under a
                           default-drop FORWARD policy

Chain names hash the service port name and protocol (and the endpoint) as kube-proxy does:
the first 16 characters of base32(sha256(...)), so they are stable across restarts.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from userproxy.iptables.rule import FILTER, NAT, Jump, Rule, Ruleset, Target, safe_comment
from userproxy.model import Endpoint, Family, ServicePort

SERVICES = "KUBE-SERVICES"
NODEPORTS = "KUBE-NODEPORTS"
MARK_MASQ = "KUBE-MARK-MASQ"
POSTROUTING = "KUBE-POSTROUTING"
EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
FORWARD = "KUBE-FORWARD"
#: Exists while userproxy's iptables mode owns the chains above: cleanup and a switch back
#: to userspace mode remove them only then, never kube-proxy's chains of the same names.
MARKER = "KUBE-USERPROXY-IPTABLES"
MASQ_BIT = 0x4000
FIXED_CHAINS: dict[str, tuple[str, ...]] = {
    FILTER: (SERVICES, EXTERNAL_SERVICES, FORWARD, MARKER),
    NAT: (SERVICES, NODEPORTS, MARK_MASQ, POSTROUTING, MARKER),
}
TABLES = tuple(FIXED_CHAINS)
HASHED_PREFIXES = ("KUBE-SVC-", "KUBE-SEP-", "KUBE-EXT-", "KUBE-SVL-", "KUBE-FW-")

NODEPORTS_COMMENT = "kubernetes service nodeports; NOTE: this must be the last rule in this chain"
REJECT = Target("REJECT", reject_with="icmp-port-unreachable")
REJECT6 = Target("REJECT", reject_with="icmp6-port-unreachable")
LB = "loadbalancer IP"
#: The `recent` match's mask: the whole client address.
FULL_MASK = {Family.IPv4: "255.255.255.255", Family.IPv6: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"}


def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def service_chain(port: ServicePort) -> str:
    return "KUBE-SVC-" + _hash(f"{port.name}{port.protocol.value.lower()}")


def external_chain(port: ServicePort) -> str:
    """KUBE-EXT-<hash>: where external destinations go under `externalTrafficPolicy: Local`."""
    return "KUBE-EXT-" + _hash(f"{port.name}{port.protocol.value.lower()}")


def firewall_chain(port: ServicePort) -> str:
    """KUBE-FW-<hash>: load-balancer traffic from `loadBalancerSourceRanges` only."""
    return "KUBE-FW-" + _hash(f"{port.name}{port.protocol.value.lower()}")


def local_chain(port: ServicePort) -> str:
    """KUBE-SVL-<hash>: the spread over this node's endpoints only."""
    return "KUBE-SVL-" + _hash(f"{port.name}{port.protocol.value.lower()}")


def endpoint_chain(port: ServicePort, endpoint: Endpoint) -> str:
    return "KUBE-SEP-" + _hash(f"{port.name}{port.protocol.value.lower()}{endpoint}")


def owned(chain: str) -> bool:
    """Whether a chain is one this mode writes (and may delete when no longer wanted)."""
    return chain.startswith(HASHED_PREFIXES) or any(chain in cs for cs in FIXED_CHAINS.values())


def _jump(table: str, chain: str, to: str, comment: str, *, new_only: bool = False) -> Jump:
    return Jump(table, chain, Rule(chain, Target(to), comment, state_new=new_only), first=True)


JUMPS: tuple[Jump, ...] = (
    _jump(NAT, "PREROUTING", SERVICES, "kubernetes service portals"),
    _jump(NAT, "OUTPUT", SERVICES, "kubernetes service portals"),
    _jump(NAT, "POSTROUTING", POSTROUTING, "kubernetes postrouting rules"),
    _jump(FILTER, "INPUT", EXTERNAL_SERVICES, "kubernetes externally-visible service portals",
          new_only=True),
    # Load-balancer IPs that are not the node's are forwarded: their drops must apply there too.
    _jump(FILTER, "FORWARD", EXTERNAL_SERVICES, "kubernetes externally-visible service portals",
          new_only=True),
    _jump(FILTER, "FORWARD", FORWARD, "kubernetes forwarding rules"),
    _jump(FILTER, "FORWARD", SERVICES, "kubernetes service portals", new_only=True),
    _jump(FILTER, "OUTPUT", SERVICES, "kubernetes service portals", new_only=True),
)  # fmt: skip


@dataclass(frozen=True)
class Backed:
    """A service port and the endpoints that serve it (already filtered for this node)."""

    port: ServicePort
    endpoints: tuple[Endpoint, ...]
    #: Those on this node (what external traffic uses under `externalTrafficPolicy: Local`).
    local_endpoints: tuple[Endpoint, ...] = ()


@dataclass(frozen=True)
class KernelConfig:
    masquerade_all: bool = False
    """`iptables.masqueradeAll`: SNAT all service traffic, not just external and hairpin."""

    family: Family = Family.IPv4
    """The family of the table these rules go to (iptables or ip6tables)."""


def _add(rs: Ruleset, table: str, chain: str, *matches: str, to: Target,
         comment: str | None = None) -> None:  # fmt: skip
    rs.add(Rule(chain, to, comment, matches=matches), table)


def build(backed: Iterable[Backed], config: KernelConfig = KernelConfig()) -> Ruleset:
    rs = Ruleset.of(FIXED_CHAINS)
    mark = f"{hex(MASQ_BIT)}/{hex(MASQ_BIT)}"
    _add(rs, NAT, MARK_MASQ, to=Target("MARK", extra=("--or-mark", hex(MASQ_BIT))))
    _add(rs, NAT, POSTROUTING, "-m", "mark", "!", "--mark", mark, to=Target("RETURN"))
    _add(rs, NAT, POSTROUTING, to=Target("MARK", extra=("--xor-mark", hex(MASQ_BIT))))
    _add(rs, NAT, POSTROUTING, comment="kubernetes service traffic requiring SNAT",
         to=Target("MASQUERADE", extra=("--random-fully",)))  # fmt: skip
    _add(rs, FILTER, FORWARD, "-m", "conntrack", "--ctstate", "INVALID", to=Target("DROP"))
    _add(rs, FILTER, FORWARD, "-m", "mark", "--mark", mark, to=Target("ACCEPT"))
    _add(rs, FILTER, FORWARD, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
         to=Target("ACCEPT"))  # fmt: skip
    for entry in sorted(backed, key=lambda b: b.port.name):
        _service_port(rs, entry, config)
    _add(rs, NAT, SERVICES, "-m", "addrtype", "--dst-type", "LOCAL", comment=NODEPORTS_COMMENT,
         to=Target(NODEPORTS))  # fmt: skip
    return rs


def _match(port: ServicePort, dport: int) -> tuple[str, ...]:
    proto = port.protocol.value.lower()
    return ("-p", proto, "-m", proto, "--dport", str(dport))


def _service_port(rs: Ruleset, entry: Backed, config: KernelConfig) -> None:
    port = entry.port
    family = config.family
    if port.family is not family or not port.cluster_ip:
        return  # the other family's provider writes it, in its own table
    reject = REJECT6 if family is Family.IPv6 else REJECT
    name = safe_comment(str(port.name))
    svc = service_chain(port)
    ips = [(port.cluster_ip, "cluster IP", config.masquerade_all)]
    ips += [(ip, "external IP", True) for ip in port.external_ips_of(family)]
    ips += [(ip, LB, True) for ip in port.load_balancer_ips_of(family)]
    if entry.endpoints and port.external_local_in_force:
        _external_local(rs, entry, ips, name, reject)
        return
    if not entry.endpoints:
        for ip, _, _ in ips:
            _add(rs, FILTER, SERVICES, "-d", port.family.host_cidr(ip), *_match(port, port.port),
                 comment=f"{name} has no endpoints", to=reject)  # fmt: skip
        if port.node_port:
            _add(rs, FILTER, EXTERNAL_SERVICES, "-m", "addrtype", "--dst-type", "LOCAL",
                 *_match(port, port.node_port), comment=f"{name} has no endpoints",
                 to=reject)  # fmt: skip
        return
    for ip, what, masquerade in ips:
        if what == LB and port.source_ranges:
            _firewalled(rs, port, ip, svc, masquerade, name)
            continue
        dst = ("-d", port.family.host_cidr(ip), *_match(port, port.port))
        if masquerade:
            _add(rs, NAT, SERVICES, *dst, comment=f"{name} {what}", to=Target(MARK_MASQ))
        _add(rs, NAT, SERVICES, *dst, comment=f"{name} {what}", to=Target(svc))
    if port.node_port:
        node_port = _match(port, port.node_port)
        _add(rs, NAT, NODEPORTS, *node_port, comment=name, to=Target(MARK_MASQ))
        _add(rs, NAT, NODEPORTS, *node_port, comment=name, to=Target(svc))
    _balance(rs, entry, svc, name)


def _external_local(
    rs: Ruleset, entry: Backed, ips: list[tuple[str, str, bool]], name: str, reject: Target
) -> None:
    """`externalTrafficPolicy: Local`, as upstream shapes it: the ClusterIP keeps the
    cluster-wide KUBE-SVC; external destinations go to KUBE-EXT, where the node's own traffic
    is sent cluster-wide (masqueraded) and everything else to KUBE-SVL, this node's endpoints,
    unmasqueraded so the endpoint sees the client. With no local endpoint, external traffic is
    dropped (a load balancer's health check moves it to other nodes)."""
    port = entry.port
    svc, ext, svl = service_chain(port), external_chain(port), local_chain(port)
    cluster_ip, *external = ips
    _add(rs, NAT, SERVICES, "-d", port.family.host_cidr(cluster_ip[0]), *_match(port, port.port),
         comment=f"{name} cluster IP", to=Target(svc))  # fmt: skip
    _balance(rs, entry, svc, name)
    local = entry.local_endpoints
    for ip, what, _ in external:
        dst = ("-d", port.family.host_cidr(ip), *_match(port, port.port))
        if local and what == LB and port.source_ranges:
            _firewalled(rs, port, ip, ext, False, name)
        elif local:
            _add(rs, NAT, SERVICES, *dst, comment=f"{name} {what}", to=Target(ext))
        else:
            _add(rs, FILTER, EXTERNAL_SERVICES, *dst,
                 comment=f"{name} has no local endpoints", to=Target("DROP"))  # fmt: skip
    if port.node_port:
        node_port = _match(port, port.node_port)
        if local:
            _add(rs, NAT, NODEPORTS, *node_port, comment=name, to=Target(ext))
        else:
            _add(rs, FILTER, EXTERNAL_SERVICES, "-m", "addrtype", "--dst-type", "LOCAL",
                 *node_port, comment=f"{name} has no local endpoints",
                 to=Target("DROP"))  # fmt: skip
    if not local:
        return
    rs.declare(NAT, ext)
    local_src = ("-m", "addrtype", "--src-type", "LOCAL")
    why = f"LOCAL traffic for {name} external destinations"
    _add(rs, NAT, ext, *local_src, comment=f"masquerade {why}", to=Target(MARK_MASQ))
    _add(rs, NAT, ext, *local_src, comment=f"route {why}", to=Target(svc))
    _add(rs, NAT, ext, to=Target(svl))
    rs.declare(NAT, svl)
    for ep in sorted(set(local) - set(entry.endpoints)):  # outside the zone the hints chose
        _endpoint(rs, port, ep, name)
    seps = [endpoint_chain(port, ep) for ep in local]
    n = len(seps)
    for i, (sep, ep) in enumerate(zip(seps, local, strict=True)):
        spread = ("-m", "statistic", "--mode", "random", "--probability", f"{1 / (n - i):.10f}")
        _add(rs, NAT, svl, *(spread if i < n - 1 else ()), comment=f"{name} -> {ep}",
             to=Target(sep))  # fmt: skip


def _firewalled(
    rs: Ruleset, port: ServicePort, ip: str, target: str, masquerade: bool, name: str
) -> None:
    """A load-balancer IP with `loadBalancerSourceRanges`: through KUBE-FW-<hash>, which sends
    on only the allowed sources; the rest keeps the LB IP as its destination and is dropped in
    the filter table (KUBE-EXTERNAL-SERVICES, from INPUT and FORWARD)."""
    fw = firewall_chain(port)
    dst = ("-d", port.family.host_cidr(ip), *_match(port, port.port))
    _add(rs, NAT, SERVICES, *dst, comment=f"{name} {LB}", to=Target(fw))
    _add(rs, FILTER, EXTERNAL_SERVICES, *dst,
         comment=f"{name} traffic not accepted by {fw}", to=Target("DROP"))  # fmt: skip
    if fw in rs.chains[NAT]:
        return  # written for an earlier LB IP of the same port
    rs.declare(NAT, fw)
    for source in port.source_ranges:
        if masquerade:
            _add(rs, NAT, fw, "-s", source, comment=f"{name} {LB}", to=Target(MARK_MASQ))
        _add(rs, NAT, fw, "-s", source, comment=f"{name} {LB}", to=Target(target))


def _balance(rs: Ruleset, entry: Backed, svc: str, name: str) -> None:
    port, endpoints = entry.port, entry.endpoints
    rs.declare(NAT, svc)
    seps = [endpoint_chain(port, ep) for ep in endpoints]
    affinity = port.affinity
    if affinity.client_ip:
        for sep, ep in zip(seps, endpoints, strict=True):
            _add(rs, NAT, svc, "-m", "recent", "--name", sep, "--mask", FULL_MASK[port.family],
                 "--rsource", "--rcheck", "--seconds", str(affinity.timeout_s), "--reap",
                 comment=f"{name} -> {ep}", to=Target(sep))  # fmt: skip
    n = len(seps)
    for i, (sep, ep) in enumerate(zip(seps, endpoints, strict=True)):
        spread = ("-m", "statistic", "--mode", "random", "--probability", f"{1 / (n - i):.10f}")
        _add(rs, NAT, svc, *(spread if i < n - 1 else ()), comment=f"{name} -> {ep}",
             to=Target(sep))  # fmt: skip
    for ep in endpoints:
        _endpoint(rs, port, ep, name)


def _endpoint(rs: Ruleset, port: ServicePort, ep: Endpoint, name: str) -> None:
    """KUBE-SEP-<hash>: hairpin masquerade, [affinity memory,] DNAT."""
    sep = endpoint_chain(port, ep)
    rs.declare(NAT, sep)
    _add(rs, NAT, sep, "-s", ep.family.host_cidr(ep.ip), comment=name, to=Target(MARK_MASQ))
    remember = ("-m", "recent", "--name", sep, "--mask", FULL_MASK[port.family], "--rsource",
                "--set") if port.affinity.client_ip else ()  # fmt: skip
    proto = port.protocol.value.lower()
    _add(rs, NAT, sep, "-p", proto, "-m", proto, *remember, comment=name,
         to=Target("DNAT", to_destination=str(ep)))  # fmt: skip
