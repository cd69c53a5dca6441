"""What the kernel modes (iptables, nftables) check on the host before they write rules."""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from userproxy.model import Family
from userproxy.provider import StartupError

log = structlog.get_logger("userproxy")


def check_root(mode: str) -> None:
    if os.geteuid() != 0:
        raise StartupError(f"proxy-mode {mode} writes kernel rules: run it as root")


def warn_if_not_forwarding(family: Family) -> None:
    forwarding = "net/ipv6/conf/all/forwarding" if family is Family.IPv6 else "net/ipv4/ip_forward"
    if _sysctl(forwarding) == "0":
        log.warning(
            "Forwarding is off: the kernel will drop service traffic it DNATs to other hosts "
            "or pods; a Kubernetes node needs it on.",
            sysctl=forwarding.replace("/", "."),
        )


def _sysctl(name: str) -> str:
    try:
        return Path(f"/proc/sys/{name}").read_text().strip()
    except OSError:
        return ""
