"""The nftables-mode plan of each service shape, as the `nft` text it writes."""

from __future__ import annotations

import re

from userproxy.model import Affinity, Endpoint, Family, Protocol, ServicePort, ServicePortName
from userproxy.nftables.transaction import Transaction
from userproxy.nftables_mode import rules
from userproxy.nftables_mode.rules import Backed, NftConfig

WEB = ServicePortName("ns1", "svc1", "p80")
EP1, EP2 = Endpoint("10.180.0.1", 80), Endpoint("10.180.0.2", 80)


IPV4 = NftConfig()


def text(backed: Backed, config: NftConfig = IPV4) -> list[str]:
    plan = rules.plan(backed, config)
    tx = Transaction(config.nft_family, rules.TABLE)
    for _, chain_rules in plan.chains:
        for rule in chain_rules:
            tx.add(rule)
    for s in plan.sets:
        tx.add(s)
    for element in plan.elements:
        tx.add(element)
    return [re.sub(r" ip6? userproxy ", " ", line.removeprefix("add ")) for line in tx.lines()]


def test_names_follow_kube_proxy() -> None:
    port = ServicePort(WEB, "172.30.0.41", 80)
    # The same hash and layout as kube-proxy's nftables mode (its unit tests' names).
    assert rules.service_chain(port) == "service-ULMVA6XW-ns1/svc1/tcp/p80"
    assert rules.endpoint_chain(port, EP1) == "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    v6 = Endpoint("fd00::1", 80)
    assert "__fd00..1/80" in rules.endpoint_chain(port, v6)


def test_cluster_ip_spreads_over_endpoint_chains() -> None:
    port = ServicePort(WEB, "172.30.0.41", 80)
    svc, ep1, ep2 = (rules.service_chain(port), rules.endpoint_chain(port, EP1),
                     rules.endpoint_chain(port, EP2))  # fmt: skip
    assert text(Backed(port, (EP1, EP2))) == [
        f"rule {svc} numgen random mod 2 == 0 goto {ep1}",
        f"rule {svc} goto {ep2}",
        f"rule {ep1} ip saddr 10.180.0.1 jump mark-for-masquerade",
        f"rule {ep1} meta l4proto tcp dnat to 10.180.0.1:80",
        f"rule {ep2} ip saddr 10.180.0.2 jump mark-for-masquerade",
        f"rule {ep2} meta l4proto tcp dnat to 10.180.0.2:80",
        "element cluster-ips { 172.30.0.41 }",
        f"element service-ips {{ 172.30.0.41 . tcp . 80 : goto {svc} }}",
    ]


def test_many_endpoints_are_picked_through_one_verdict_map() -> None:
    port = ServicePort(WEB, "172.30.0.41", 80)
    many = tuple(Endpoint(f"10.180.1.{i}", 80) for i in range(1, rules.CASCADE_MAX + 2))
    first = text(Backed(port, many))[0]
    assert first.startswith(f"rule {rules.service_chain(port)} numgen random mod 9 vmap {{ 0 : ")
    assert first.count("goto endpoint-") == 9
    svc = rules.service_chain(port)
    a, b, c = (rules.endpoint_chain(port, ep) for ep in many[:3])
    assert text(Backed(port, many[:3]))[:3] == [  # 1/3, then 1/2 of the rest, then the last
        f"rule {svc} numgen random mod 3 == 0 goto {a}",
        f"rule {svc} numgen random mod 2 == 0 goto {b}",
        f"rule {svc} goto {c}",
    ]


def test_no_endpoints_is_rejected_everywhere() -> None:
    port = ServicePort(ServicePortName("ns", "empty", "dns", Protocol.UDP), "172.30.0.42", 53,
                       node_port=30053, external_ips=("192.168.99.11",))  # fmt: skip
    assert text(Backed(port, ())) == [
        "element cluster-ips { 172.30.0.42 }",
        "element no-endpoint-services { 172.30.0.42 . udp . 53 : goto reject-chain,"
        " 192.168.99.11 . udp . 53 : goto reject-chain }",
        "element no-endpoint-nodeports { udp . 30053 : goto reject-chain }",
    ]


def test_external_destinations_masquerade_then_go_cluster_wide() -> None:
    port = ServicePort(
        WEB,
        "172.30.0.41",
        80,
        node_port=3001,
        external_ips=("192.168.99.22",),
        load_balancer_ips=("1.2.3.4",),
        source_ranges=("203.0.113.0/25",),
    )
    svc, ext, fw = rules.service_chain(port), rules.external_chain(port), rules.firewall_chain(port)
    lines = text(Backed(port, (EP1,)))
    assert f"rule {ext} jump mark-for-masquerade" in lines
    assert f"rule {ext} goto {svc}" in lines
    assert f"rule {fw} ip saddr != {{ 203.0.113.0/25 }} drop" in lines
    assert (
        f"element service-ips {{ 172.30.0.41 . tcp . 80 : goto {svc},"
        f" 192.168.99.22 . tcp . 80 : goto {ext}, 1.2.3.4 . tcp . 80 : goto {ext} }}"
    ) in lines
    assert f"element firewall-ips {{ 1.2.3.4 . tcp . 80 : goto {fw} }}" in lines
    assert f"element service-nodeports {{ tcp . 3001 : goto {ext} }}" in lines


def test_affinity_remembers_clients_per_endpoint() -> None:
    port = ServicePort(WEB, "172.30.0.41", 80, affinity=Affinity(True, 10800))
    svc, ep1 = rules.service_chain(port), rules.endpoint_chain(port, EP1)
    aff = rules.affinity_set(port, EP1)
    lines = text(Backed(port, (EP1,)))
    assert lines[0] == f"rule {svc} ip saddr @{aff} goto {ep1}"
    assert f"rule {ep1} update @{aff} {{ ip saddr }}" in lines
    assert f"set {aff} {{ type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }}" in lines


def test_external_traffic_policy_local() -> None:
    port = ServicePort(WEB, "172.30.0.41", 80, node_port=3001, external_local=True)
    svc, ext, local = (rules.service_chain(port), rules.external_chain(port),
                       rules.local_chain(port))  # fmt: skip
    lines = text(Backed(port, (EP1, EP2), local=(EP2,)))
    assert [ln for ln in lines if ln.startswith(f"rule {ext} ")] == [
        f'rule {ext} fib saddr type local jump mark-for-masquerade comment "masquerade local'
        ' traffic"',
        f'rule {ext} fib saddr type local goto {svc} comment "short-circuit local traffic"',
        f"rule {ext} goto {local}",
    ]
    assert f"rule {local} goto {rules.endpoint_chain(port, EP2)}" in lines
    # No endpoint here: external traffic is dropped, the node's own still short-circuited.
    lines = text(Backed(port, (EP1,), local=()))
    assert "element no-endpoint-nodeports { tcp . 3001 : drop }" in lines
    assert f"rule {ext} goto {local}" not in lines and "service-nodeports" in " ".join(lines)


def test_internal_traffic_policy_local_without_local_endpoints_drops() -> None:
    port = ServicePort(WEB, "172.30.0.41", 80, internal_local=True)
    assert "element no-endpoint-services { 172.30.0.41 . tcp . 80 : drop }" in text(
        Backed(port, (EP1,), local=())
    )


def test_masquerade_all_and_ipv6() -> None:
    port = ServicePort(WEB, "fd00:30::41", 80)
    ep = Endpoint("fd00:180::1", 80)
    config = NftConfig(family=Family.IPv6, masquerade_all=True)
    lines = text(Backed(port, (ep,)), config)
    svc = rules.service_chain(port)
    assert lines[0] == f"rule {svc} ip6 daddr fd00:30::41 tcp dport 80 jump mark-for-masquerade"
    assert any(ln.endswith("meta l4proto tcp dnat to [fd00:180::1]:80") for ln in lines)
    assert text(Backed(port, (ep,))) == []  # an IPv6 port is not written to the IPv4 table


def test_setup_names_every_hook_and_nodeport_addresses() -> None:
    tx = Transaction(NftConfig().nft_family, rules.TABLE)
    rules.setup(tx, NftConfig(nodeport_cidrs=("192.168.50.0/24",)), recreate_base=False)
    out = tx.text()
    assert "add chain ip userproxy nat-prerouting { type nat hook prerouting priority -100" in out
    assert "filter-output-post-dnat { type filter hook output priority -90" in out
    assert "add element ip userproxy nodeport-ips { 192.168.50.0/24 }" in out
    assert "fib daddr type local ip daddr @nodeport-ips ip daddr != 127.0.0.0/8" in out
