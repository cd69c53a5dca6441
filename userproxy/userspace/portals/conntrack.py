"""Forgetting conntrack entries of UDP service ports that went away: otherwise clients keep
sending into the dead mapping until it times out (kube-proxy's `ClearEntriesForIP`).

Every port removed in a sync is flushed in one batch, by one `conntrack --load-file` process
(a line per address; a line that matches nothing does not stop the rest), after the sync has
rewritten the rules, and off its critical path: removing 1,000 UDP ports costs the sync no more
than removing 1,000 TCP ones.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from typing import Protocol

import structlog

from userproxy.model import Family, ServicePort

log = structlog.get_logger("userproxy.portals")


class Conntrack(Protocol):
    def flush_udp(self, ports: Sequence[ServicePort]) -> None:
        """Delete the UDP entries whose original destination was one of these ports."""
        ...


def delete_lines(ports: Sequence[ServicePort]) -> list[str]:
    """`conntrack` command lines deleting the UDP entries of these service ports."""
    lines = []
    for port in ports:
        for ip in (port.cluster_ip, *port.external_ips, *port.load_balancer_ips):
            family = "-f ipv6 " if Family.of(ip) is Family.IPv6 else ""
            lines.append(f"-D {family}-p udp --orig-dst {ip} --orig-port-dst {port.port}")
        if port.node_port:
            lines.append(f"-D -p udp --orig-port-dst {port.node_port}")
    return lines


class ExecConntrack:
    """The `conntrack` tool in batch mode; without it, stale UDP mappings only time out."""

    def flush_udp(self, ports: Sequence[ServicePort]) -> None:
        if not ports:
            return
        if shutil.which("conntrack") is None:
            log.warning("conntrack is not installed; stale UDP mappings will only time out.")
            return
        with tempfile.NamedTemporaryFile("w", prefix="userproxy-conntrack-") as batch:
            batch.write("\n".join(delete_lines(ports)) + "\n")
            batch.flush()
            result = subprocess.run(
                ["conntrack", "--load-file", batch.name],
                capture_output=True,
                text=True,
                check=False,
            )
        if result.returncode != 0:
            log.warning(
                "Could not flush the conntrack entries of removed UDP service ports.",
                ports=len(ports),
                reason=result.stderr.strip().splitlines()[-1:] or None,
            )
