"""What a running proxy serves, as JSON (`/status`, read by `userproxy ls`), and its
rendering in the spirit of `ipvsadm -Ln`. Pure: the JSON is made from a provider's
`ProxyStatus`, the rendering takes the JSON form.

    Prot VirtualAddress:Port        Service              ProxyPort  Scheduler
      -> Endpoint                     ActiveConn  TotalConn     InBytes    OutBytes
    TCP  10.96.0.10:80              default/web:http     40123      rr
         NodePort 30080  LoadBalancer 10.96.100.1
      -> 10.244.0.2:8080                       1         12        1284       48211
"""

from __future__ import annotations

from typing import Any

from userproxy.model import Family, ServicePort
from userproxy.provider import EndpointStatus, ProxyStatus, ServicePortStatus

Status = dict[str, Any]


def to_json(status: ProxyStatus) -> Status:
    """The status as `/status` serves it. An endpoint out of rotation is listed while it
    still has connections open."""
    return {
        "mode": status.mode,
        "service_ports": [_port_json(sp) for sp in status.service_ports],
        "failed": [{"name": str(name), "reason": reason} for name, reason in status.failed],
        "refused": [
            {
                "object": f"{r.kind} {r.namespace}/{r.name}",
                "origin": r.origin or None,
                "reason": r.reason,
            }
            for r in status.refused
        ],
    }


def _port_json(sp: ServicePortStatus) -> dict[str, Any]:
    port = sp.port
    return {
        "name": str(port.name),
        "protocol": port.protocol.value,
        "family": port.family.value,
        "cluster_ip": port.cluster_ip,
        "port": port.port,
        "node_port": port.node_port or None,
        "node_port_error": sp.node_port_error,
        "external_ips": list(port.external_ips),
        "load_balancer_ips": list(port.load_balancer_ips),
        "proxy_port": sp.proxy_port,
        "external_traffic_policy": "Local" if port.external_local else "Cluster",
        "external_proxy_port": sp.external_proxy_port,
        "local_endpoints": sp.local_endpoints,
        "internal_traffic_policy": "Local" if port.internal_local else "Cluster",
        "health_check_node_port": port.health_check_node_port or None,
        "proxy_protocol": f"v{port.proxy_protocol}" if port.proxy_protocol else None,
        "session_affinity": affinity_text(port),
        "rejected": sp.rejected,
        "endpoints": [
            _endpoint_json(e)
            for e in sp.endpoints
            if not e.removed or (e.counters is not None and e.counters.active)
        ],
    }


def _endpoint_json(e: EndpointStatus) -> dict[str, Any]:
    """Counters the proxy does not keep (the kernel carries the traffic) are None."""
    c = e.counters
    return {
        "address": str(e.endpoint),
        "active": c.active if c else None,
        "total": c.total if c else e.kernel_connections,
        "bytes_from_clients": c.bytes_from_clients if c else None,
        "bytes_to_clients": c.bytes_to_clients if c else None,
        "dial_failures": c.dial_failures if c else None,
        "removed": e.removed,
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


def _policies(sp: dict[str, Any]) -> list[str]:
    """The traffic policies in force, in a few words (`ls`)."""
    out = []
    if sp.get("external_traffic_policy") == "Local" and (
        sp["node_port"] or sp["external_ips"] or sp["load_balancer_ips"]
    ):
        local = sp.get("local_endpoints", 0)
        doing = "dropping external traffic" if not local else "external traffic stays here"
        out.append(f"etp=Local ({local} local endpoints: {doing})")
    if sp.get("internal_traffic_policy") == "Local":
        out.append("itp=Local")
    if sp.get("health_check_node_port"):
        out.append(f"healthCheckNodePort {sp['health_check_node_port']}")
    if sp.get("proxy_protocol"):
        out.append(f"PROXY protocol {sp['proxy_protocol']}")
    return out


#: Per (service port, family, endpoint): new connections per second, bytes in and out per second.
Rates = dict[tuple[str, str, str], tuple[float, float, float]]


def rates(before: Status, after: Status, seconds: float) -> Rates:
    """What moved per second between two readings (`ls --watch`, like `ipvsadm --rate`).
    Counters that went down (a restart) count from zero; the kernel's missing ones as 0."""

    def totals(status: Status) -> dict[tuple[str, str, str], tuple[int, int, int]]:
        out = {}
        for sp in status["service_ports"]:
            for ep in sp["endpoints"]:
                key = (sp["name"], sp.get("family", "IPv4"), ep["address"])
                out[key] = (ep["total"] or 0, ep["bytes_from_clients"] or 0,
                            ep["bytes_to_clients"] or 0)  # fmt: skip
        return out

    old, new = totals(before), totals(after)
    span = max(seconds, 1e-6)
    result: Rates = {}
    for key, values in new.items():
        prior = old.get(key, (0, 0, 0))
        deltas = [v - p if v >= p else v for v, p in zip(values, prior, strict=True)]
        result[key] = (deltas[0] / span, deltas[1] / span, deltas[2] / span)
    return result


def _rate(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}" if value >= 10 or value == 0 else f"{value:.1f}"


def render(status: Status, per_second: Rates | None = None) -> str:
    lines = [
        f"{'Prot':<5}{'VirtualAddress:Port':<26}{'Service':<32}{'ProxyPort':>9}  Scheduler",
        f"  -> {'Endpoint':<28}{'ActiveConn':>11}{'TotalConn':>11}{'InBytes':>12}{'OutBytes':>12}"
        + (f"{'Conn/s':>9}{'InB/s':>9}{'OutB/s':>9}" if per_second is not None else ""),
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
        extras += _policies(sp)
        if extras:
            lines.append("     " + "  ".join(extras))
        if not sp["endpoints"]:
            away = "" if sp["rejected"] is None else f"; {sp['rejected']} turned away"
            lines.append(f"  -> (no endpoints: refused{away})")
        for ep in sp["endpoints"]:
            address = ep["address"] + (" (removed)" if ep["removed"] else "")
            cells = [_cell(ep[k]) for k in ("active", "total", "bytes_from_clients")]
            row = (
                f"  -> {address:<28}{cells[0]:>11}{cells[1]:>11}"
                f"{cells[2]:>12}{_cell(ep['bytes_to_clients']):>12}"
            )
            if per_second is not None:
                key = (sp["name"], sp.get("family", "IPv4"), ep["address"])
                conns, inbound, outbound = per_second.get(key, (0.0, 0.0, 0.0))
                row += f"{_rate(conns):>9}{_rate(inbound):>9}{_rate(outbound):>9}"
            lines.append(row)
    for failed in status["failed"]:
        lines.append(f"!    {failed['name']}: not served: {failed['reason']}")
    for refused in status.get("refused", ()):
        lines.append(f"!    {refused['object']}: refused: {refused['reason']}")
    return "\n".join(lines) + "\n"
