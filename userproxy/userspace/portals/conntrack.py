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

#: Seconds a conntrack run may take; beyond that it is killed (entries then time out).
CONNTRACK_TIMEOUT = 20.0


class Conntrack(Protocol):
    def flush_udp(self, ports: Sequence[ServicePort]) -> None:
        """Delete the UDP entries whose original destination was one of these ports."""
        ...

    def flush_unredirected(self, ports: Sequence[ServicePort]) -> None:
        """Delete the TCP and UDP entries to these ports that the portals did not redirect."""
        ...


#: (protocol, destination address or None for "any node address", destination port)
Destination = tuple[str, str | None, int]


def service_destinations(ports: Sequence[ServicePort]) -> set[Destination]:
    """Where clients send to reach these service ports: addresses and ports, NodePorts."""
    out: set[Destination] = set()
    for port in ports:
        protocol = port.protocol.value.lower()
        for ip in (port.cluster_ip, *port.external_ips, *port.load_balancer_ips):
            out.add((protocol, ip, port.port))
        if port.node_port:
            out.add((protocol, None, port.node_port))
    return out


def unredirected_lines(listing: str, wanted: set[Destination]) -> list[str]:
    """From a `conntrack -L` listing, the command lines deleting the entries to `wanted` that
    were not redirected: their reply comes from the very address and port the client sent to
    (a portal would have rewritten it). Each line names one entry by its original tuple, so
    the batch costs one table walk per entry found, not per service address."""
    lines = []
    for entry in listing.splitlines():
        words = entry.split()
        if not words or words[0] not in ("tcp", "udp"):
            continue
        values = [w.split("=", 1) for w in words if "=" in w]
        tuples = [v for k, v in values if k in ("src", "dst", "sport", "dport")]
        if len(tuples) < 8:
            continue
        src, dst, sport, dport, reply_src, _, reply_sport, _ = tuples[:8]
        if reply_src != dst or reply_sport != dport:
            continue  # redirected or DNATed: left alone
        hit = (words[0], dst, int(dport)) in wanted or (words[0], None, int(dport)) in wanted
        if hit:
            family = "-f ipv6 " if Family.of(dst) is Family.IPv6 else ""
            lines.append(f"-D {family}-p {words[0]} -s {src} -d {dst} "
                         f"--sport {sport} --dport {dport}")  # fmt: skip
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
        if not ports or not self._available():
            return
        wanted = service_destinations(ports)
        families = {Family.of(ip) for _, ip, _ in wanted if ip is not None} | {Family.IPv4}
        lines = []
        for family in sorted(families):
            listing = self._call(["conntrack", "-L", "-f", family.value.lower()])
            if listing is not None:
                lines += unredirected_lines(listing.stdout, wanted)
        if lines:
            self._run(lines, "Could not flush the conntrack entries made while the portal "
                      "rules were absent.", len(ports))  # fmt: skip

    @staticmethod
    def _available() -> bool:
        if shutil.which("conntrack") is None:
            log.warning("conntrack is not installed; stale mappings will only time out.")
            return False
        return True

    @staticmethod
    def _call(argv: list[str]) -> subprocess.CompletedProcess[str] | None:
        """Run the tool, bounded in time (an exit must never wait long for it)."""
        try:
            return subprocess.run(
                argv, capture_output=True, text=True, check=False, timeout=CONNTRACK_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            log.warning("conntrack took too long; stale mappings will only time out.",
                        command=argv[1])  # fmt: skip
            return None

    def _run(self, lines: list[str], failure: str, count: int) -> None:
        if not self._available():
            return
        with tempfile.NamedTemporaryFile("w", prefix="userproxy-conntrack-") as batch:
            batch.write("\n".join(lines) + "\n")
            batch.flush()
            result = self._call(["conntrack", "--load-file", batch.name])
        if result is None:
            return
        if result.returncode != 0:
            log.warning(
                failure,
                ports=count,
                reason=result.stderr.strip().splitlines()[-1:] or None,
            )
