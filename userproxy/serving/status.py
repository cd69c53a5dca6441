"""What a running proxy serves, as plain data (served as JSON for `userproxy ls`), and its
rendering in the spirit of `ipvsadm -Ln`. Pure: the data is read from the proxy by the
caller, the rendering takes the JSON form.

    Prot VirtualAddress:Port        Service              ProxyPort  Scheduler
      -> Endpoint                     ActiveConn  TotalConn     InBytes    OutBytes
    TCP  10.96.0.10:80              default/web:http     40123      rr
         NodePort 30080  LoadBalancer 10.96.100.1
      -> 10.244.0.2:8080                       1         12        1284       48211
"""

from __future__ import annotations

from typing import Any

from userproxy.model import Family, ServicePort, ServicePortName
from userproxy.userspace.proxier import Proxier
from userproxy.userspace.stats import CountersSnapshot, snapshot

Status = dict[str, Any]


def collect(
    proxier: Proxier,
    node_port_errors: dict[ServicePortName, str] | None = None,
    extra: dict[str, dict[str, CountersSnapshot]] | None = None,
) -> Status:
    """`extra`: counters of other worker processes, per service port and endpoint."""
    ports = []
    for name, rt in sorted(proxier.runtimes.items()):
        port = rt.port
        current = set(proxier.balancer.endpoints(name))
        theirs = (extra or {}).get(str(name), {})
        merged = {ep: snapshot(c) for ep, c in rt.stats.endpoints.items()}
        for ep in current:
            merged.setdefault(ep, CountersSnapshot())
        for ep, c in list(merged.items()):
            merged[ep] = c + theirs.get(str(ep), CountersSnapshot())
        endpoints = [
            endpoint_row(str(ep), c, removed=ep not in current)
            for ep, c in sorted(merged.items())
            if ep in current or c.active
        ]
        ports.append(
            {
                "name": str(name),
                "protocol": port.protocol.value,
                "family": port.family.value,
                "cluster_ip": port.cluster_ip,
                "port": port.port,
                "node_port": port.node_port or None,
                "node_port_error": (node_port_errors or {}).get(name),
                "external_ips": list(port.external_ips),
                "load_balancer_ips": list(port.load_balancer_ips),
                "proxy_port": rt.proxy_port,
                "session_affinity": affinity_text(port),
                "rejected": rt.stats.rejected,
                "endpoints": endpoints,
            }
        )
    failed = [{"name": str(n), "reason": r} for n, r in sorted(proxier.failed.items())]
    return {"service_ports": ports, "failed": failed}


def endpoint_row(
    address: str, counters: CountersSnapshot | None, *, removed: bool = False
) -> dict[str, Any]:
    """One endpoint of `ls`; None counters (iptables mode) are the ones the kernel keeps no
    record of."""
    c = counters
    return {
        "address": address,
        "active": c.active if c else None,
        "total": c.total if c else None,
        "bytes_from_clients": c.bytes_from_clients if c else None,
        "bytes_to_clients": c.bytes_to_clients if c else None,
        "dial_failures": c.dial_failures if c else None,
        "removed": removed,
    }


def affinity_text(port: ServicePort) -> str:
    policy = port.affinity
    return f"ClientIP {policy.timeout_s}s" if policy.client_ip else "None"


def _vip(sp: dict[str, Any]) -> str:
    # Older proxies' JSON has no family: they served IPv4 only.
    return Family(sp.get("family", "IPv4")).address_port(sp["cluster_ip"], sp["port"])


def _cell(value: object) -> str:
    """Counters the kernel does not keep (iptables mode) show as -."""
    return "-" if value is None else str(value)


def render(status: Status) -> str:
    lines = [
        f"{'Prot':<5}{'VirtualAddress:Port':<26}{'Service':<32}{'ProxyPort':>9}  Scheduler",
        f"  -> {'Endpoint':<28}{'ActiveConn':>11}{'TotalConn':>11}{'InBytes':>12}{'OutBytes':>12}",
    ]
    for sp in status["service_ports"]:
        scheduler = "rr" + (
            f" persistent {sp['session_affinity'].split()[1]}"
            if sp["session_affinity"] != "None"
            else ""
        )
        proxy_port = "kernel" if sp["proxy_port"] is None else sp["proxy_port"]
        lines.append(
            f"{sp['protocol']:<5}{_vip(sp):<26}{sp['name']:<32}{proxy_port:>9}  {scheduler}"
        )
        extras = []
        if sp["node_port"]:
            extras.append(f"NodePort {sp['node_port']}")
            if sp["node_port_error"]:
                extras.append(f"(not served: {sp['node_port_error']})")
        if sp["load_balancer_ips"]:
            extras.append("LoadBalancer " + ",".join(sp["load_balancer_ips"]))
        if sp["external_ips"]:
            extras.append("externalIPs " + ",".join(sp["external_ips"]))
        if extras:
            lines.append("     " + "  ".join(extras))
        if not sp["endpoints"]:
            away = "" if sp["rejected"] is None else f"; {sp['rejected']} turned away"
            lines.append(f"  -> (no endpoints: refused{away})")
        for ep in sp["endpoints"]:
            address = ep["address"] + (" (removed)" if ep["removed"] else "")
            cells = [_cell(ep[k]) for k in ("active", "total", "bytes_from_clients")]
            lines.append(
                f"  -> {address:<28}{cells[0]:>11}{cells[1]:>11}"
                f"{cells[2]:>12}{_cell(ep['bytes_to_clients']):>12}"
            )
    for failed in status["failed"]:
        lines.append(f"!    {failed['name']}: not served: {failed['reason']}")
    return "\n".join(lines) + "\n"
