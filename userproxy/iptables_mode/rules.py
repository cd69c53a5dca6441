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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from userproxy.model import Endpoint, Family, ServicePort
from userproxy.portals.rules import Jump, Rule, Target, safe_comment

NAT, FILTER = "nat", "filter"
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
HASHED_PREFIXES = ("KUBE-SVC-", "KUBE-SEP-")

NODEPORTS_COMMENT = "kubernetes service nodeports; NOTE: this must be the last rule in this chain"


def _hash(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def service_chain(port: ServicePort) -> str:
    return "KUBE-SVC-" + _hash(f"{port.name}{port.protocol.value.lower()}")


def endpoint_chain(port: ServicePort, endpoint: Endpoint) -> str:
    return "KUBE-SEP-" + _hash(f"{port.name}{port.protocol.value.lower()}{endpoint}")


def _jump(table: str, chain: str, to: str, comment: str, *, new_only: bool = False) -> Jump:
    # Rule's ctstate match only knows "! DNAT"; the NEW-only jumps use the state match.
    return Jump(table, chain, Rule(chain, Target(to), comment, state_new=new_only), first=True)


JUMPS: tuple[Jump, ...] = (
    _jump(NAT, "PREROUTING", SERVICES, "kubernetes service portals"),
    _jump(NAT, "OUTPUT", SERVICES, "kubernetes service portals"),
    _jump(NAT, "POSTROUTING", POSTROUTING, "kubernetes postrouting rules"),
    _jump(FILTER, "INPUT", EXTERNAL_SERVICES, "kubernetes externally-visible service portals",
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


@dataclass(frozen=True)
class KernelConfig:
    masquerade_all: bool = False
    """`iptables.masqueradeAll`: SNAT all service traffic, not just external and hairpin."""


@dataclass
class KernelRuleset:
    """Every chain's lines (`-A ...`), per table, in order."""

    chains: dict[str, dict[str, list[str]]] = field(
        default_factory=lambda: {t: {c: [] for c in cs} for t, cs in FIXED_CHAINS.items()}
    )

    def add(self, table: str, chain: str, *args: str) -> None:
        self.chains[table].setdefault(chain, []).append(" ".join(["-A", chain, *args]))

    def chain(self, table: str, name: str) -> None:
        self.chains[table].setdefault(name, [])


def build(backed: Iterable[Backed], config: KernelConfig = KernelConfig()) -> KernelRuleset:
    rs = KernelRuleset()
    rs.add(NAT, MARK_MASQ, "-j", "MARK", "--or-mark", hex(MASQ_BIT))
    mark = f"{hex(MASQ_BIT)}/{hex(MASQ_BIT)}"
    rs.add(NAT, POSTROUTING, "-m", "mark", "!", "--mark", mark, "-j", "RETURN")
    rs.add(NAT, POSTROUTING, "-j", "MARK", "--xor-mark", hex(MASQ_BIT))
    snat = '"kubernetes service traffic requiring SNAT"'
    rs.add(NAT, POSTROUTING, "-m", "comment", "--comment", snat,
           "-j", "MASQUERADE", "--random-fully")  # fmt: skip
    rs.add(FILTER, FORWARD, "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")
    rs.add(FILTER, FORWARD, "-m", "mark", "--mark", mark, "-j", "ACCEPT")
    rs.add(FILTER, FORWARD, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT")
    for entry in sorted(backed, key=lambda b: b.port.name):
        _service_port(rs, entry, config)
    rs.add(NAT, SERVICES, "-m", "comment", "--comment", f'"{NODEPORTS_COMMENT}"',
           "-m", "addrtype", "--dst-type", "LOCAL", "-j", NODEPORTS)  # fmt: skip
    return rs


def _match(port: ServicePort, dport: int) -> list[str]:
    proto = port.protocol.value.lower()
    return ["-p", proto, "-m", proto, "--dport", str(dport)]


def _service_port(rs: KernelRuleset, entry: Backed, config: KernelConfig) -> None:
    port = entry.port
    if port.family is not Family.IPv4 or not port.cluster_ip:
        return  # iptables is IPv4; IPv6 service ports need ip6tables (not done)
    name = safe_comment(str(port.name))
    svc = service_chain(port)
    ips = [(port.cluster_ip, "cluster IP", config.masquerade_all)]
    ips += [(ip, "external IP", True) for ip in port.external_ips_of(Family.IPv4)]
    ips += [(ip, "loadbalancer IP", True) for ip in port.load_balancer_ips_of(Family.IPv4)]
    if not entry.endpoints:
        for ip, _, _ in ips:
            rs.add(FILTER, SERVICES, "-m", "comment", "--comment", f'"{name} has no endpoints"',
                   "-d", f"{ip}/32", *_match(port, port.port),
                   "-j", "REJECT", "--reject-with", "icmp-port-unreachable")  # fmt: skip
        if port.node_port:
            rs.add(FILTER, EXTERNAL_SERVICES, "-m", "comment", "--comment",
                   f'"{name} has no endpoints"', "-m", "addrtype", "--dst-type", "LOCAL",
                   *_match(port, port.node_port),
                   "-j", "REJECT", "--reject-with", "icmp-port-unreachable")  # fmt: skip
        return
    for ip, what, masquerade in ips:
        comment = ["-m", "comment", "--comment", f'"{name} {what}"']
        dst = ["-d", f"{ip}/32", *_match(port, port.port)]
        if masquerade:
            rs.add(NAT, SERVICES, *comment, *dst, "-j", MARK_MASQ)
        rs.add(NAT, SERVICES, *comment, *dst, "-j", svc)
    if port.node_port:
        comment = ["-m", "comment", "--comment", f"{name}"]
        rs.add(NAT, NODEPORTS, *comment, *_match(port, port.node_port), "-j", MARK_MASQ)
        rs.add(NAT, NODEPORTS, *comment, *_match(port, port.node_port), "-j", svc)
    _balance(rs, entry, svc, name)


def _balance(rs: KernelRuleset, entry: Backed, svc: str, name: str) -> None:
    port, endpoints = entry.port, entry.endpoints
    rs.chain(NAT, svc)
    seps = [endpoint_chain(port, ep) for ep in endpoints]
    affinity = port.affinity
    if affinity.client_ip:
        for sep, ep in zip(seps, endpoints, strict=True):
            seconds = str(affinity.timeout_s)
            rs.add(NAT, svc, "-m", "comment", "--comment", f'"{name} -> {ep}"',
                   "-m", "recent", "--name", sep, "--mask", "255.255.255.255", "--rsource",
                   "--rcheck", "--seconds", seconds, "--reap", "-j", sep)  # fmt: skip
    n = len(seps)
    for i, (sep, ep) in enumerate(zip(seps, endpoints, strict=True)):
        comment = ["-m", "comment", "--comment", f'"{name} -> {ep}"']
        if i < n - 1:
            probability = f"{1 / (n - i):.10f}"
            rs.add(NAT, svc, *comment, "-m", "statistic", "--mode", "random",
                   "--probability", probability, "-j", sep)  # fmt: skip
        else:
            rs.add(NAT, svc, *comment, "-j", sep)
    for sep, ep in zip(seps, endpoints, strict=True):
        rs.chain(NAT, sep)
        comment = ["-m", "comment", "--comment", f"{name}"]
        rs.add(NAT, sep, *comment, "-s", f"{ep.ip}/32", "-j", MARK_MASQ)
        remember = (["-m", "recent", "--name", sep, "--mask", "255.255.255.255", "--rsource",
                     "--set"] if port.affinity.client_ip else [])  # fmt: skip
        rs.add(NAT, sep, *comment, *_match_proto(port), *remember,
               "-j", "DNAT", "--to-destination", str(ep))  # fmt: skip


def _match_proto(port: ServicePort) -> list[str]:
    proto = port.protocol.value.lower()
    return ["-p", proto, "-m", proto]


def restore_text(
    desired: KernelRuleset,
    written: KernelRuleset | None,
    existing: dict[str, set[str]],
    *,
    add_jumps: Sequence[Jump] = (),
) -> str:
    """One `iptables-restore --noflush` batch: chains whose content changed since `written`
    (all of them when it is None) are flushed and refilled, unchanged ones are left alone,
    and chains of ours that exist in the kernel (`existing`) but are no longer wanted are
    flushed and deleted, after every reference to them has been rewritten."""
    out: list[str] = []
    for table in (FILTER, NAT):
        chains = desired.chains[table]
        before = written.chains[table] if written is not None else {}
        changed = [c for c, lines in chains.items() if written is None or before.get(c) != lines]
        stale = sorted(c for c in existing.get(table, set()) if c not in chains and _ours(c))
        jumps = [j for j in add_jumps if j.table == table]
        if not (changed or stale or jumps):
            continue
        out.append(f"*{table}")
        out += [f":{c} - [0:0]" for c in changed]
        out += [f":{c} - [0:0]" for c in stale]
        for c in changed:
            out += chains[c]
        for jump in jumps:
            out.append(jump.rule.line.replace(f"-A {jump.chain}", f"-I {jump.chain} 1", 1))
        out += [f"-X {c}" for c in stale]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def _ours(chain: str) -> bool:
    return chain.startswith(HASHED_PREFIXES) or any(chain in cs for cs in FIXED_CHAINS.values())


def owned_chain_names() -> set[str]:
    return {c for cs in FIXED_CHAINS.values() for c in cs}
