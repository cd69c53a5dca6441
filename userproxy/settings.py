"""`Settings`: every setting of a proxy instance, in one root, validated once. Pure.

Grouped as kube-proxy's `KubeProxyConfiguration` is: its top-level fields, then sections
named after its own (`clientConnection`, `iptables`, `logging`) and userproxy's
(`sources`, `userspace`). The `--config` file and the flags both produce it, flags
overriding the file (`from_options`, fed by `userproxy.config` and the CLI); embedders build
it directly, or with the flat `ProxySettings(...)`. Worker processes receive it as data.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from userproxy import modes
from userproxy.model import Family, Topology
from userproxy.ports import PortRange, parse_port_range

LogFormat = Literal["auto", "console", "json"]
PortalsChoice = Literal["auto", "on", "off"]
PortalsBackend = Literal["auto", "iptables", "nftables"]
BackendChoice = Literal["auto", "legacy", "nft"]


class SettingsError(ValueError):
    """A setting that cannot work; the message names the setting and says why."""


def split_address(address: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` (all addresses); ValueError naming the input."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{address!r}: {host!r} is not an IP address") from None
    return host, int(port)


def default_node_name() -> str:
    """kube-proxy's rule: `--hostname-override`, else the hostname, lower-cased.

    `NODE_NAME` (set from the downward API in the DaemonSet) is honoured first, so the pod's
    own hostname never stands in for the node's.
    """
    return (os.environ.get("NODE_NAME") or socket.gethostname()).strip().lower()


@dataclass(frozen=True)
class ClientConnectionSettings:
    """`clientConnection`: how to reach the API server."""

    kubeconfig: str = ""
    """`kubeconfig` (`--kubeconfig`): the kubeconfig file; empty means in-cluster config."""

    master: str = ""
    """`--master`: the API server URL, overriding the kubeconfig's."""


@dataclass(frozen=True)
class IPTablesSettings:
    """`iptables`: the sync rhythm of every mode, and the iptables-mode options."""

    sync_period: float = 30.0
    """`syncPeriod`, seconds: the longest gap between two syncs, and between two full
    rewrites of the kernel rules (which repair what others deleted)."""

    min_sync_period: float = 1.0
    """`minSyncPeriod`, seconds: the shortest gap between two syncs."""

    masquerade_all: bool = False
    """`masqueradeAll`: iptables mode SNATs all service traffic, not only external and hairpin."""

    backend: BackendChoice = "auto"
    """`--iptables-backend`: legacy (python-iptables) or nft (iptables-nft-restore); auto
    follows the host, as kube-proxy's iptables wrappers do."""

    def __post_init__(self) -> None:
        if self.min_sync_period < 0 or self.sync_period <= 0:
            raise SettingsError("iptables sync periods must be positive")
        if self.min_sync_period > self.sync_period:
            raise SettingsError("iptables-min-sync-period must not exceed iptables-sync-period")
        if self.backend not in ("auto", "legacy", "nft"):
            raise SettingsError(f"iptables-backend {self.backend!r} is not auto, legacy or nft")


@dataclass(frozen=True)
class LoggingSettings:
    """`logging`: how much to log, and how."""

    verbosity: int = 0
    """`-v`: 0 warnings and the main events, 1 info, 2 debug (klog-style levels)."""

    format: LogFormat = "auto"
    """`--log-format`: console on a terminal, JSON otherwise, unless chosen."""


@dataclass(frozen=True)
class SourceSettings:
    """Where Services and endpoints come from (userproxy's)."""

    manifests: str = ""
    """`--manifests`: a file or directory of YAML to serve instead of following a cluster."""

    service_proxy_name: str | None = None
    """`--service-proxy-name`: serve only Services labelled with this proxy name; None serves
    the Services without the label, as kube-proxy does."""

    use_endpoints: bool = False
    """`--use-endpoints`: watch core/v1 Endpoints instead of EndpointSlices (before 1.21)."""

    node_port_range: PortRange | None = field(default_factory=lambda: PortRange(30000, 2768))
    """`--service-node-port-range` (the API server's flag): NodePorts from manifests and the
    Python API must fall in it; None: not checked. Services from the API server were checked
    against the cluster's own range there."""


@dataclass(frozen=True)
class UserspaceSettings:
    """The userspace mode's own options (userproxy's)."""

    portals: PortalsChoice = "auto"
    """`--portals`: install the iptables portals that send service traffic to the proxy
    ports; auto means on when running as root."""

    portals_backend: PortalsBackend = "auto"
    """`--portals-backend`: iptables (KUBE-PORTALS-* chains, the old shapes) or nftables (one
    `userproxy-portals` table of maps); auto: nftables where the host uses nftables natively
    and no iptables rules, else iptables."""

    workers: int = 1
    """`--workers`: processes serving the data plane (SO_REUSEPORT, steered by client IP)."""

    allow_loopback_bind: bool = False
    """Embedding without portals may listen on loopback; with portals kube-proxy refuses it,
    because PREROUTING DNAT to 127.0.0.1 is dropped by the kernel (route_localnet=0)."""

    workers_reuse_port: bool = False
    """Bind listeners with SO_REUSEPORT even with one worker (tests of the worker path)."""

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 64:
            raise SettingsError("workers must be between 1 and 64")
        if self.portals not in ("auto", "on", "off"):
            raise SettingsError(f"portals {self.portals!r} is not auto, on or off")
        if self.portals_backend not in ("auto", "iptables", "nftables"):
            raise SettingsError(
                f"portals-backend {self.portals_backend!r} is not auto, iptables or nftables"
            )


@dataclass(frozen=True)
class HandoverSettings:
    """Restarts without a dropped connection (see `userproxy.handover`)."""

    drain_timeout: float = 25.0
    """`--drain-timeout`: after handing its sockets to a successor, a process keeps relaying
    its established connections and UDP flows for at most this long, then exits."""

    successor_wait: float = 0.0
    """`--successor-wait`: on SIGTERM, keep serving up to this long for a successor to take
    over (a DaemonSet's replacement pod). If none comes, exit leaving the rules and the
    proxy-port journal, so the next process serves the same ports. 0: on SIGTERM remove the
    rules and exit at once."""

    take_over: bool = True
    """`--take-over/--no-take-over`: a process that finds another managing this network
    namespace takes over its sockets (a restart); with --no-take-over it refuses to start."""

    linger_after_handover: bool = False
    """`--linger-after-handover`: once drained after a hand-over, stay (idle) until SIGTERM
    instead of exiting: under a supervisor that restarts exited processes (a pod's
    container), exiting would start a process that takes the sockets back."""

    def __post_init__(self) -> None:
        if self.drain_timeout < 0 or self.successor_wait < 0:
            raise SettingsError("drain-timeout and successor-wait must not be negative")


@dataclass(frozen=True)
class Settings:
    """`KubeProxyConfiguration`, as userproxy reads it."""

    mode: str = "userspace"
    """`mode` (`--proxy-mode`): which provider serves the traffic (see `userproxy.modes`)."""

    bind_address: str = "0.0.0.0"
    """`bindAddress`: the address the proxy sockets listen on. 0.0.0.0 means every address,
    with portal rules REDIRECTing to the address traffic arrived on."""

    bind_address_hard_fail: bool = False
    """`bindAddressHardFail`: exit if the health or metrics server cannot bind."""

    healthz_bind_address: str = "0.0.0.0:10256"
    """`healthzBindAddress`: host:port of /healthz and /livez; empty disables them."""

    metrics_bind_address: str = "127.0.0.1:10249"
    """`metricsBindAddress`: host:port of /metrics, /status and the rest; empty disables."""

    hostname_override: str = ""
    """`hostnameOverride`: this node's name (for traffic policies); empty: see `node_name`."""

    node_zone: str = ""
    """`--node-zone`: this node's zone, for topology-aware routing. Empty: with the API
    server, its Node's `topology.kubernetes.io/zone` label; with manifests, no zone (zone
    hints are then not used)."""

    nodeport_addresses: tuple[str, ...] = ()
    """`nodePortAddresses`: CIDRs whose addresses answer NodePorts; empty means all."""

    external_ip_cidrs: tuple[str, ...] = ()
    """`--external-ip-cidrs`: externalIPs must fall in these CIDRs (empty: no such limit).
    Another Service's ClusterIP is never one; a node address only when listed here."""

    port_range: PortRange | None = None
    """`portRange`: where proxy ports come from; None lets the kernel choose."""

    udp_idle_timeout: float = 0.25
    """`udpIdleTimeout`, seconds: a UDP flow with no traffic either way for this long ends."""

    instance_lock: bool = True
    """`--instance-lock`: refuse to start while another instance manages this network
    namespace's rules (see `userproxy.instance`); off only for tests that need two."""

    client_connection: ClientConnectionSettings = field(default_factory=ClientConnectionSettings)
    iptables: IPTablesSettings = field(default_factory=IPTablesSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    sources: SourceSettings = field(default_factory=SourceSettings)
    userspace: UserspaceSettings = field(default_factory=UserspaceSettings)
    handover: HandoverSettings = field(default_factory=HandoverSettings)

    node_name: str = field(init=False, compare=False)
    """This node's name: `hostname_override`, else `NODE_NAME`, else the hostname."""

    bind_family: Family = field(init=False, compare=False, repr=False)
    wildcard_bind: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        try:
            address = ipaddress.ip_address(self.bind_address)
        except ValueError:
            raise SettingsError(
                f"bind-address {self.bind_address!r} is not an IP address"
            ) from None
        if self.mode not in modes.MODES:
            raise SettingsError(
                f"proxy-mode {self.mode!r} is not supported ({', '.join(modes.MODES)})"
            )
        if address.is_loopback and not self.userspace.allow_loopback_bind and self.is_userspace:
            raise SettingsError(
                f"bind-address {self.bind_address} is a loopback address: cannot proxy on "
                "localhost (portal rules cannot redirect traffic there); use 0.0.0.0 or a node IP"
            )
        if self.udp_idle_timeout <= 0:
            raise SettingsError("udp-timeout must be greater than zero")
        for flag, server in (
            ("healthz-bind-address", self.healthz_bind_address),
            ("metrics-bind-address", self.metrics_bind_address),
        ):
            if server:
                try:
                    split_address(server)
                except ValueError as err:
                    raise SettingsError(f"{flag}: {err}") from None
        if self.sources.manifests and (
            self.client_connection.kubeconfig or self.client_connection.master
        ):
            raise SettingsError(
                "give either --manifests or an API server (--kubeconfig, --master), not both"
            )
        node = (self.hostname_override or default_node_name()).strip().lower()
        object.__setattr__(self, "node_name", node)
        object.__setattr__(self, "bind_family", Family.of(str(address)))
        object.__setattr__(self, "wildcard_bind", address.is_unspecified)

    @property
    def topology(self) -> Topology:
        return Topology(self.node_name, self.node_zone)

    @property
    def is_userspace(self) -> bool:
        return self.mode == "userspace"

    # Shorthands for the sync rhythm every mode follows.
    @property
    def sync_period(self) -> float:
        return self.iptables.sync_period

    @property
    def min_sync_period(self) -> float:
        return self.iptables.min_sync_period


def ProxySettings(
    *,
    bind_address: str = "0.0.0.0",
    port_range: PortRange | None = None,
    udp_idle_timeout: float = 0.25,
    sync_period: float = 30.0,
    min_sync_period: float = 1.0,
    node_name: str = "",
    allow_loopback_bind: bool = False,
    mode: str = "userspace",
    workers_reuse_port: bool = False,
    workers: int = 1,
) -> Settings:
    """`Settings` from the flat keywords embedders use:

    UserProxy(ProxySettings(bind_address="127.0.0.1", allow_loopback_bind=True))
    """
    return Settings(
        mode=mode,
        bind_address=bind_address,
        hostname_override=node_name,
        port_range=port_range,
        udp_idle_timeout=udp_idle_timeout,
        iptables=IPTablesSettings(sync_period=sync_period, min_sync_period=min_sync_period),
        userspace=UserspaceSettings(
            workers=workers,
            allow_loopback_bind=allow_loopback_bind,
            workers_reuse_port=workers_reuse_port,
        ),
    )


# ----------------------------------------------------------------------------- options
#: `userproxy run` option -> where it lives in Settings (section.field, or a root field).
OPTIONS: dict[str, str] = {
    "proxy_mode": "mode",
    "instance_lock": "instance_lock",
    "bind_address": "bind_address",
    "bind_address_hard_fail": "bind_address_hard_fail",
    "healthz_bind_address": "healthz_bind_address",
    "metrics_bind_address": "metrics_bind_address",
    "hostname_override": "hostname_override",
    "node_zone": "node_zone",
    "nodeport_addresses": "nodeport_addresses",
    "external_ip_cidrs": "external_ip_cidrs",
    "proxy_port_range": "port_range",
    "udp_timeout": "udp_idle_timeout",
    "kubeconfig": "client_connection.kubeconfig",
    "master": "client_connection.master",
    "iptables_sync_period": "iptables.sync_period",
    "iptables_min_sync_period": "iptables.min_sync_period",
    "masquerade_all": "iptables.masquerade_all",
    "iptables_backend": "iptables.backend",
    "verbosity": "logging.verbosity",
    "log_format": "logging.format",
    "manifests": "sources.manifests",
    "service_proxy_name": "sources.service_proxy_name",
    "use_endpoints": "sources.use_endpoints",
    "service_node_port_range": "sources.node_port_range",
    "portals": "userspace.portals",
    "portals_backend": "userspace.portals_backend",
    "workers": "userspace.workers",
    "drain_timeout": "handover.drain_timeout",
    "successor_wait": "handover.successor_wait",
    "linger_after_handover": "handover.linger_after_handover",
    "take_over": "handover.take_over",
}


def from_options(options: Mapping[str, Any]) -> Settings:
    """Settings from `userproxy run` option values (flags merged over a config file); options
    not given keep their defaults. Raises SettingsError naming a bad value."""
    root: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for option, value in options.items():
        path = OPTIONS.get(option)
        if path is None or value is None:
            continue
        section, _, name = path.rpartition(".")
        target = sections.setdefault(section, {}) if section else root
        target[name] = _convert(option, value)
    try:
        built = {name: _SECTIONS[name](**values) for name, values in sections.items()}
        return Settings(**root, **built)
    except TypeError as err:  # a value of the wrong type reached a dataclass
        raise SettingsError(str(err)) from None


_SECTIONS: dict[str, type[Any]] = {
    "client_connection": ClientConnectionSettings,
    "iptables": IPTablesSettings,
    "logging": LoggingSettings,
    "sources": SourceSettings,
    "userspace": UserspaceSettings,
    "handover": HandoverSettings,
}


def _convert(option: str, value: Any) -> Any:
    try:
        if option in ("proxy_port_range", "service_node_port_range"):
            return parse_port_range(value)
        if option in ("nodeport_addresses", "external_ip_cidrs"):
            return cidrs(value, flag=option.replace("_", "-"))
    except ValueError as err:
        raise SettingsError(str(err)) from None
    if option == "manifests":
        return str(value)
    return value


def cidrs(values: Any, *, flag: str) -> tuple[str, ...]:
    """CIDRs from flag values (comma-separated or repeated), in normal form."""
    if isinstance(values, str):
        values = [values]
    out = []
    for value in values or ():
        for cidr in str(value).split(","):
            if cidr.strip():
                try:
                    out.append(str(ipaddress.ip_network(cidr.strip(), strict=False)))
                except ValueError:
                    raise SettingsError(f"{flag}: {cidr!r} is not a CIDR") from None
    return tuple(out)


def to_options(settings: Settings) -> dict[str, Any]:
    """The option values that produce `settings` (for `--write-config-to` and /configz)."""
    out: dict[str, Any] = {}
    for option, path in OPTIONS.items():
        value: Any = settings
        for part in path.split("."):
            value = getattr(value, part)
        if option in ("proxy_port_range", "service_node_port_range"):
            value = "" if value is None else str(value)
        out[option] = value
    return out


# ----------------------------------------------------------------------------- as data
def to_data(settings: Settings) -> dict[str, Any]:
    """Settings as plain JSON-able data (sent to worker processes)."""
    return _fields(settings)


def _fields(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        out[f.name] = _fields(value) if dataclasses.is_dataclass(value) else value
    return out


def from_data(data: Mapping[str, Any]) -> Settings:
    """The inverse of `to_data` (validated again, as every Settings is)."""
    root = dict(data)
    for name, cls in _SECTIONS.items():
        if name in root:
            root[name] = cls(**root[name])
    if root.get("port_range") is not None:
        root["port_range"] = PortRange(**root["port_range"])
    root["nodeport_addresses"] = tuple(root.get("nodeport_addresses") or ())
    return Settings(**root)
