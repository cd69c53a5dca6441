"""KubeProxyConfiguration loading and writing."""

from __future__ import annotations

import pytest

from userproxy import config

FULL = """
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 10.0.0.5
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 5
hostnameOverride: node-a
mode: userspace
portRange: 30000-32767
udpIdleTimeout: 250ms
iptables:
  syncPeriod: 1m0s
  minSyncPeriod: 1s
  masqueradeAll: false
nodePortAddresses: [10.0.0.0/8]
conntrack: {maxPerCore: 32768}
ipvs: {scheduler: rr}
featureGates: {}
"""


def test_every_used_field_maps_to_its_option_and_other_modes_fields_are_ignored() -> None:
    assert config.load(FULL) == {
        "bind_address": "10.0.0.5",
        "healthz_bind_address": "0.0.0.0:10256",
        "metrics_bind_address": "127.0.0.1:10249",
        "kubeconfig": "/var/lib/kube-proxy/kubeconfig.conf",
        "hostname_override": "node-a",
        "proxy_mode": "userspace",
        "proxy_port_range": "30000-32767",
        "udp_timeout": 0.25,
        "iptables_sync_period": 60.0,
        "iptables_min_sync_period": 1.0,
        "masquerade_all": False,
        "nodeport_addresses": ("10.0.0.0/8",),
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bindAdress: 1.2.3.4", "unknown field 'bindAdress'"),
        ("iptables: {syncPeriod: soon}", "iptables.syncPeriod: invalid duration 'soon'"),
        ("iptables: {bogus: 1}", "unknown field 'iptables.bogus'"),
        ("mode: ipvs", "mode: 'ipvs' is not supported"),
        ("iptables: {masqueradeAll: 1}", "iptables.masqueradeAll: expected true or false"),
        ("nodePortAddresses: [nonsense]", "nodePortAddresses[0]: 'nonsense' is not a CIDR"),
        ("bindAddressHardFail: yes please", "bindAddressHardFail: expected true or false"),
        ("clientConnection: 3", "clientConnection: expected a mapping"),
    ],
)
def test_bad_fields_are_named(text: str, message: str) -> None:
    doc = f"apiVersion: {config.API_VERSION}\nkind: {config.KIND}\n{text}\n"
    with pytest.raises(config.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config.load(doc, source="kp.yaml")


def test_wrong_kind_or_yaml_is_refused() -> None:
    with pytest.raises(config.ConfigError, match="apiVersion/kind must be"):
        config.load("apiVersion: v1\nkind: ConfigMap\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load("a: [")


def test_dump_round_trips() -> None:
    options = config.load(FULL)
    assert config.load(config.dump(options)) == options


def test_errors_name_the_file_and_the_field_once() -> None:
    doc = f"apiVersion: {config.API_VERSION}\nkind: {config.KIND}\niptables: {{syncPeriod: 3}}\n"
    with pytest.raises(config.ConfigError) as err:
        config.load(doc, source="kp.yaml")
    assert str(err.value) == "kp.yaml: iptables.syncPeriod: expected a string, got 3"
