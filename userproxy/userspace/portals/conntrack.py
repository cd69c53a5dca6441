"""Forgetting conntrack entries that would misroute later packets.

- UDP service ports that went away: otherwise clients keep sending into the dead mapping until
  it times out (kube-proxy's `ClearEntriesForIP`).
- Entries made while the portal rules were absent (before the first sync, while a flush of
  the rules was being healed): a connection attempt to a service address in that gap got an
  entry *without* the redirect, and NAT is decided only when an entry is created, so a later
  connection that reuses the source port matches it and goes nowhere (a TCP SYN_SENT entry
  lives 120 s). An un-redirected entry is recognised by its reply coming from the very
  address and port the client sent to; redirected ones are left alone.

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

    def flush_unredirected(self, ports: Sequence[ServicePort]) -> None:
        """Delete the TCP and UDP entries to these ports that the portals did not redirect."""
        ...


def unredirected_lines(ports: Sequence[ServicePort]) -> list[str]:
    """`conntrack` command lines deleting the entries to these service ports that were made
    without a redirect (their reply source is the service address and port itself)."""
    lines = []
    for port in ports:
        protocol = port.protocol.value.lower()
        for ip in (port.cluster_ip, *port.external_ips, *port.load_balancer_ips):
            family = "-f ipv6 " if Family.of(ip) is Family.IPv6 else ""
            lines.append(
                f"-D {family}-p {protocol} --orig-dst {ip} --orig-port-dst {port.port} "
                f"--reply-src {ip} --reply-port-src {port.port}"
            )
        if port.node_port:
            lines.append(
                f"-D -p {protocol} --orig-port-dst {port.node_port} "
                f"--reply-port-src {port.node_port}"
            )
    return lines


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
        if ports:
            self._run(delete_lines(ports), "Could not flush the conntrack entries of removed "
                      "UDP service ports.", len(ports))  # fmt: skip

    def flush_unredirected(self, ports: Sequence[ServicePort]) -> None:
        if ports:
            self._run(unredirected_lines(ports), "Could not flush the conntrack entries made "
                      "while the portal rules were absent.", len(ports))  # fmt: skip

    def _run(self, lines: list[str], failure: str, count: int) -> None:
        if shutil.which("conntrack") is None:
            log.warning("conntrack is not installed; stale mappings will only time out.")
            return
        with tempfile.NamedTemporaryFile("w", prefix="userproxy-conntrack-") as batch:
            batch.write("\n".join(lines) + "\n")
            batch.flush()
            result = subprocess.run(
                ["conntrack", "--load-file", batch.name],
                capture_output=True,
                text=True,
                check=False,
            )
        if result.returncode != 0:
            log.warning(
                failure,
                ports=count,
                reason=result.stderr.strip().splitlines()[-1:] or None,
            )
