"""The portal rule builder against expected rule text, per service shape."""

from __future__ import annotations

from userproxy.model import Protocol, ServicePort, ServicePortName
from userproxy.portals.rules import JUMPS, PortalConfig, PortalPort, build, restore_text

WILDCARD = PortalConfig(bind_address="0.0.0.0", host_ip="10.0.0.5")
NAME = ServicePortName("ns", "web", "http")


def lines(
    port: ServicePort,
    *,
    config: PortalConfig = WILDCARD,
    endpoints: bool = True,
    claimed: bool = True,
) -> list[str]:
    ruleset = build([PortalPort(port, 40123, endpoints, claimed)], config)
    return [
        r.line() for chains in ruleset.chains.values() for rules in chains.values() for r in rules
    ]


def test_cluster_ip_redirect_and_host_dnat() -> None:
    got = lines(ServicePort(NAME, "10.96.0.10", 80))
    assert got[:2] == [
        "-A KUBE-PORTALS-CONTAINER -m comment --comment ns/web:http -p tcp -m tcp --dport 80 "
        "-d 10.96.0.10/32 -j REDIRECT --to-ports 40123",
        "-A KUBE-PORTALS-HOST -m comment --comment ns/web:http -p tcp -m tcp --dport 80 "
        "-d 10.96.0.10/32 -j DNAT --to-destination 10.0.0.5:40123",
    ]


def test_specific_bind_address_dnats_from_both_chains() -> None:
    got = lines(
        ServicePort(NAME, "10.96.0.10", 80),
        config=PortalConfig(bind_address="10.0.0.7", host_ip="10.0.0.5"),
    )
    assert got[0].endswith("-j DNAT --to-destination 10.0.0.7:40123")
    assert got[1].endswith("-j DNAT --to-destination 10.0.0.7:40123")


def test_external_ip_three_rules_and_lb_ip_two() -> None:
    port = ServicePort(
        NAME, "10.96.0.10", 80, external_ips=("1.2.3.4",), load_balancer_ips=("5.6.7.8",)
    )
    got = [ln for ln in lines(port) if "1.2.3.4" in ln or "5.6.7.8" in ln]
    assert got == [
        "-A KUBE-PORTALS-CONTAINER -m comment --comment ns/web:http -p tcp -m tcp --dport 80 "
        "-d 5.6.7.8/32 -j REDIRECT --to-ports 40123",
        "-A KUBE-PORTALS-CONTAINER -m comment --comment ns/web:http -p tcp -m tcp --dport 80 "
        "-d 1.2.3.4/32 -m physdev ! --physdev-is-in -j REDIRECT --to-ports 40123",
        "-A KUBE-PORTALS-CONTAINER -m comment --comment ns/web:http -p tcp -m tcp --dport 80 "
        "-d 1.2.3.4/32 -m addrtype --dst-type LOCAL -j REDIRECT --to-ports 40123",
        "-A KUBE-PORTALS-HOST -m comment --comment ns/web:http -p tcp -m tcp --dport 80 "
        "-d 5.6.7.8/32 -j DNAT --to-destination 10.0.0.5:40123",
        "-A KUBE-PORTALS-HOST -m comment --comment ns/web:http -p tcp -m tcp --dport 80 "
        "-d 1.2.3.4/32 -m addrtype --dst-type LOCAL -j DNAT --to-destination 10.0.0.5:40123",
    ]


def test_udp_node_port_rules_exclude_loopback_from_prerouting() -> None:
    name = ServicePortName("ns", "dns", "", Protocol.UDP)
    got = [
        ln for ln in lines(ServicePort(name, "10.96.0.10", 53, node_port=30053)) if "NODEPORT" in ln
    ]
    assert got == [
        "-A KUBE-NODEPORT-CONTAINER -m comment --comment ns/dns -p udp -m udp --dport 30053 "
        "! -d 127.0.0.0/8 -j REDIRECT --to-ports 40123",
        "-A KUBE-NODEPORT-HOST -m comment --comment ns/dns -p udp -m udp --dport 30053 "
        "-j DNAT --to-destination 10.0.0.5:40123",
        "-A KUBE-NODEPORT-NON-LOCAL -m comment --comment ns/dns -p udp -m udp --dport 40123 "
        "-m state --state NEW -j ACCEPT",
    ]


def test_nodeport_addresses_limit_the_destinations() -> None:
    config = PortalConfig("0.0.0.0", "10.0.0.5", nodeport_cidrs=("10.0.0.0/24", "127.0.0.0/8"))
    got = [
        ln
        for ln in lines(ServicePort(NAME, "10.96.0.10", 80, node_port=30080), config=config)
        if "KUBE-NODEPORT-" in ln and "NON-LOCAL" not in ln
    ]
    assert [ln.split(" -j ")[0].split("--dport 30080 ")[1] for ln in got] == [
        "-d 10.0.0.0/24",
        "-d 10.0.0.0/24",
        "-d 127.0.0.0/8",
    ]
    assert "KUBE-NODEPORT-HOST" in got[2]  # localhost NodePorts only from OUTPUT


def test_unclaimed_node_port_gets_no_rules() -> None:
    got = lines(ServicePort(NAME, "10.96.0.10", 80, node_port=30080), claimed=False)
    assert not any("NODEPORT" in ln for ln in got)


def test_filter_guard_and_no_endpoint_reject() -> None:
    got = [
        ln
        for ln in lines(ServicePort(NAME, "10.96.0.10", 80), endpoints=False)
        if "KUBE-USERPROXY-FILTER" in ln
    ]
    assert got == [
        "-A KUBE-USERPROXY-FILTER -m comment --comment ns/web:http -p tcp -m tcp --dport 40123 "
        "! -i lo -m conntrack ! --ctstate DNAT -j REJECT --reject-with icmp-port-unreachable",
        "-A KUBE-USERPROXY-FILTER -m comment --comment ns/web:http -p tcp -m tcp --dport 40123 "
        "-j REJECT --reject-with icmp-port-unreachable",
    ]
    assert (
        len(
            [
                ln
                for ln in lines(ServicePort(NAME, "10.96.0.10", 80))
                if "KUBE-USERPROXY-FILTER" in ln
            ]
        )
        == 1
    )


def test_restore_batch_declares_every_chain_and_adds_missing_jumps() -> None:
    text = restore_text(build([], WILDCARD), missing_jumps=JUMPS)
    assert text.splitlines()[:5] == [
        "*nat",
        ":KUBE-PORTALS-CONTAINER - [0:0]",
        ":KUBE-PORTALS-HOST - [0:0]",
        ":KUBE-NODEPORT-CONTAINER - [0:0]",
        ":KUBE-NODEPORT-HOST - [0:0]",
    ]
    assert (
        '-I PREROUTING 1 -m comment --comment "handle ClusterIPs; NOTE: this must be before'
        ' the NodePort rules" -j KUBE-PORTALS-CONTAINER'
    ) in text
    assert "-A OUTPUT -m comment --comment" in text and "-j KUBE-NODEPORT-HOST" in text
    assert text.count("COMMIT") == 2
