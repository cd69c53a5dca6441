"""What the kernel modes (iptables, nftables) share: the host checks before they write rules,
their dual-stack assembly, and the hand-over methods that have nothing to do where the kernel
serves."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import structlog

from userproxy.dualstack import DualStack
from userproxy.model import Endpoint, Family, ServicePortName, is_loopback
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


def ipv4_first(
    make: Callable[[Family, Callable[[], object]], Any], take_over_rules: Callable[[], object]
) -> DualStack:
    """The IPv4 provider now (it takes the node's rules over), the IPv6 one when the first IPv6
    Service or endpoint arrives; a family that cannot be served is reported, not fatal."""

    def factory(family: Family) -> Any:
        try:
            return make(family, lambda: None)
        except StartupError as err:
            return str(err)

    return DualStack(make(Family.IPv4, take_over_rules), Family.IPv4, factory)


class KernelServed:
    """The `Provider` methods of a mode whose traffic the kernel carries: no listeners to hand
    over or drain, and rules that stay when the process stops (the kernel keeps serving)."""

    _thread: Any  # the mode's `RuleWriter`

    def listener_ports(self) -> dict[str, int]:
        return {}

    def handover_fds(self) -> list[tuple[str, int]]:
        return []  # there is nothing to hand over but the lock

    def stop_accepting(self) -> None:
        """Nothing accepts here."""

    async def drain(self, timeout: float) -> int:
        return 0

    async def close(self, *, keep_rules: bool = False) -> None:
        """The rules stay: the kernel keeps serving while no proxy runs."""
        self._thread.close()


class LoopbackFilter:
    """Leaves loopback endpoints out of kernel rules: DNAT to 127.0.0.0/8 would hand pods the
    node's private listeners (the API server refuses such endpoints; a manifest may name
    them). Each one left out is logged once."""

    def __init__(self) -> None:
        self._refused: set[tuple[ServicePortName, Endpoint]] = set()

    def routable(self, name: ServicePortName, endpoints: Iterable[Endpoint]) -> Iterator[Endpoint]:
        for endpoint in endpoints:
            if not is_loopback(endpoint.ip):
                yield endpoint
            elif (name, endpoint) not in self._refused:
                self._refused.add((name, endpoint))
                log.warning("Left out an endpoint on loopback: the kernel modes cannot serve it.",
                            service=str(name), endpoint=str(endpoint))  # fmt: skip
