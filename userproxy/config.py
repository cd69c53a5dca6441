"""`--config FILE`: a KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1). Pure.

The fields this mode uses map onto `userproxy run` options; flags given on the command line
override them. Other v1alpha1 fields (ipvs, conntrack, ...) are accepted and ignored, so a
kubeadm-generated file loads; anything else is an error naming the field, as is a value of
the wrong type.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from userproxy.durations import format_duration, parse_duration
from userproxy.modes import MODES

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"


class ConfigError(ValueError):
    pass


def _string(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{field}: expected a string, got {value!r}")
    return value


def _duration(field: str, value: Any) -> float:
    text = _string(field, value)
    try:
        return parse_duration(text)
    except ValueError as err:
        raise ConfigError(f"{field}: {err}") from None


def _bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{field}: expected true or false, got {value!r}")
    return value


def _mode(field: str, value: Any) -> str:
    mode = _string(field, value)
    if mode and mode not in MODES:
        raise ConfigError(f"{field}: {mode!r} is not supported ({', '.join(MODES)})")
    return mode or "userspace"


def _cidrs(field: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError(f"{field}: expected a list of CIDRs, got {value!r}")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(str(ipaddress.ip_network(_string(f"{field}[{i}]", item), strict=False)))
        except ValueError:
            raise ConfigError(f"{field}[{i}]: {item!r} is not a CIDR") from None
    return tuple(out)


Parse = Callable[[str, Any], Any]

#: config field (dotted) -> (`userproxy run` option, parser)
USED: dict[str, tuple[str, Parse]] = {
    "bindAddress": ("bind_address", _string),
    "bindAddressHardFail": ("bind_address_hard_fail", _bool),
    "healthzBindAddress": ("healthz_bind_address", _string),
    "metricsBindAddress": ("metrics_bind_address", _string),
    "clientConnection.kubeconfig": ("kubeconfig", _string),
    "hostnameOverride": ("hostname_override", _string),
    "mode": ("proxy_mode", _mode),
    "portRange": ("proxy_port_range", _string),
    "udpIdleTimeout": ("udp_timeout", _duration),
    "iptables.syncPeriod": ("iptables_sync_period", _duration),
    "iptables.minSyncPeriod": ("iptables_min_sync_period", _duration),
    "iptables.masqueradeAll": ("masquerade_all", _bool),
    "nodePortAddresses": ("nodeport_addresses", _cidrs),
}

#: v1alpha1 fields other modes use: accepted, not applied.
IGNORED = {
    "clientConnection.acceptContentTypes",
    "clientConnection.burst",
    "clientConnection.contentType",
    "clientConnection.qps",
    "clusterCIDR",
    "configSyncPeriod",
    "conntrack",
    "detectLocal",
    "detectLocalMode",
    "enableProfiling",
    "featureGates",
    "iptables.localhostNodePorts",
    "iptables.masqueradeBit",
    "ipvs",
    "logging",
    "nftables",
    "oomScoreAdj",
    "showHiddenMetricsForVersion",
    "winkernel",
    "windowsRunAsService",
}
SECTIONS = {"clientConnection", "iptables"}


def load(text: str, *, source: str = "config") -> dict[str, Any]:
    """The `userproxy run` options a KubeProxyConfiguration document sets."""
    try:
        doc = yaml.safe_load(text)
    except Exception as err:  # YAMLError, and PyYAML's ValueError/KeyError on odd values
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a {KIND} mapping")
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != KIND:
        raise ConfigError(
            f"{source}: apiVersion/kind must be {API_VERSION}/{KIND}, "
            f"got {doc.get('apiVersion')}/{doc.get('kind')}"
        )
    options: dict[str, Any] = {}
    try:
        for field, value in _flatten(
            {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}
        ):
            if field in USED:
                option, parse = USED[field]
                options[option] = parse(field, value)
            elif field not in IGNORED:
                raise ConfigError(f"unknown field {field!r}")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return options


def _flatten(doc: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in doc.items():
        field = f"{prefix}{key}"
        if key in SECTIONS and not prefix:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{field}: expected a mapping, got {value!r}")
            out += _flatten(value, f"{field}.")
        else:
            out.append((field, value))
    return out


def dump(options: Mapping[str, Any]) -> str:
    """The effective configuration as a KubeProxyConfiguration (`--write-config-to`)."""
    return yaml.safe_dump(document(options), sort_keys=False)


def document(options: Mapping[str, Any]) -> dict[str, Any]:
    """The effective configuration as a KubeProxyConfiguration document, in its field names
    (`--write-config-to`, and `/configz` as kube-proxy serves it)."""
    doc: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND}
    for field, (option, parse) in USED.items():
        if option not in options:
            continue
        value = options[option]
        if parse is _duration:
            value = format_duration(value)
        elif parse is _cidrs:
            value = list(value) or None
        elif value is None:
            value = ""
        target = doc
        *sections, leaf = field.split(".")
        for section in sections:
            target = target.setdefault(section, {})
        target[leaf] = value
    return doc
