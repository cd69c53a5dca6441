"""Settings of a proxy instance, named after the KubeProxyConfiguration fields they mirror."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field

from userproxy.model import Family
from userproxy.ports import PortRange


class SettingsError(ValueError):
    """A setting that cannot work; the message names the setting and says why."""


def default_node_name() -> str:
    """kube-proxy's rule: `--hostname-override`, else the hostname, lower-cased.

    `NODE_NAME` (set from the downward API in the DaemonSet) is honoured first, so the pod's
    own hostname never stands in for the node's.
    """
    return (os.environ.get("NODE_NAME") or socket.gethostname()).strip().lower()


@dataclass(frozen=True)
class ProxySettings:
    bind_address: str = "0.0.0.0"
    """`bindAddress`: the address the proxy sockets listen on. 0.0.0.0 means every address,
    with portal rules REDIRECTing to the address traffic arrived on."""

    port_range: PortRange | None = None
    """`portRange`: where proxy ports come from; None lets the kernel choose."""

    udp_idle_timeout: float = 0.25
    """`udpIdleTimeout`, seconds: a UDP flow with no traffic either way for this long ends."""

    sync_period: float = 30.0
    """`iptables.syncPeriod`, seconds: the longest gap between two syncs (rules re-asserted)."""

    min_sync_period: float = 1.0
    """`iptables.minSyncPeriod`, seconds: the shortest gap between two syncs."""

    node_name: str = field(default_factory=default_node_name)
    """`hostnameOverride`: this node's name, for `internalTrafficPolicy: Local`."""

    allow_loopback_bind: bool = False
    """Embedding without portals may listen on loopback; with portals kube-proxy refuses it,
    because PREROUTING DNAT to 127.0.0.1 is dropped by the kernel (route_localnet=0)."""

    mode: str = "userspace"
    """`mode`: userspace (listeners and relays) or iptables (kernel rules only)."""

    workers_reuse_port: bool = False
    """Bind listeners with SO_REUSEPORT (several worker processes on the same proxy ports)."""

    workers: int = 1
    """`--workers`: processes serving the data plane (SO_REUSEPORT, steered by client IP)."""

    def __post_init__(self) -> None:
        try:
            address = ipaddress.ip_address(self.bind_address)
        except ValueError:
            raise SettingsError(
                f"bind-address {self.bind_address!r} is not an IP address"
            ) from None
        if self.mode not in ("userspace", "iptables"):
            raise SettingsError(f"proxy-mode {self.mode!r} is not supported (userspace, iptables)")
        if address.is_loopback and not self.allow_loopback_bind and self.mode == "userspace":
            raise SettingsError(
                f"bind-address {self.bind_address} is a loopback address: cannot proxy on "
                "localhost (portal rules cannot redirect traffic there); use 0.0.0.0 or a node IP"
            )
        if not 1 <= self.workers <= 64:
            raise SettingsError("workers must be between 1 and 64")
        if self.udp_idle_timeout <= 0:
            raise SettingsError("udp-timeout must be greater than zero")
        if self.min_sync_period < 0 or self.sync_period <= 0:
            raise SettingsError("iptables sync periods must be positive")
        if self.min_sync_period > self.sync_period:
            raise SettingsError("iptables-min-sync-period must not exceed iptables-sync-period")

    @property
    def wildcard_bind(self) -> bool:
        return ipaddress.ip_address(self.bind_address).is_unspecified

    @property
    def bind_family(self) -> Family:
        return Family.of(self.bind_address)
