"""Forgetting conntrack entries of a UDP service port that went away: otherwise clients keep
sending into the dead mapping until it times out (kube-proxy's `ClearEntriesForIP`)."""

from __future__ import annotations

import shutil
import subprocess
from typing import Protocol

import structlog

from userproxy.model import ServicePort

log = structlog.get_logger("userproxy.userspace.portals")


class Conntrack(Protocol):
    def flush_udp(self, port: ServicePort) -> None: ...


class ExecConntrack:
    """The `conntrack` tool; without it, stale UDP mappings only time out."""

    def flush_udp(self, port: ServicePort) -> None:
        if shutil.which("conntrack") is None:
            log.warning("conntrack is not installed; stale UDP mappings will only time out.")
            return
        targets = [
            ["--orig-dst", ip, "--orig-port-dst", str(port.port)]
            for ip in (port.cluster_ip, *port.external_ips, *port.load_balancer_ips)
        ]
        if port.node_port:
            targets.append(["--orig-port-dst", str(port.node_port)])
        for target in targets:
            # Exit status 1 only means nothing matched.
            subprocess.run(
                ["conntrack", "-D", "-p", "udp", *target], capture_output=True, check=False
            )
