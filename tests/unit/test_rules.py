"""The portal rule builder against expected rule text, per service shape."""

from __future__ import annotations

from userproxy.model import Protocol, ServicePort, ServicePortName
from userproxy.userspace.portals.rules import (
    JUMPS,
    Jump,
    JumpPlan,
    PortalConfig,
    PortalPort,
    RuleBuilder,
    build,
    guard_rules,
    plan_jumps,
    restore_text,
)

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
    return [  # nat first, as the shapes read in the reference
        r.line
        for table in ("nat", "filter")
        for rules in ruleset.chains[table].values()
        for r in rules
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
        '-A KUBE-USERPROXY-FILTER -m comment --comment "userproxy: refuse traffic to proxy ports'
        ' that bypassed the portals" -p tcp -m multiport --dports 40123 ! -i lo -m conntrack'
        " ! --ctstate DNAT -j REJECT --reject-with icmp-port-unreachable",
        "-A KUBE-USERPROXY-FILTER -m comment --comment ns/web:http -p tcp -m tcp --dport 40123 "
        "-j REJECT --reject-with icmp-port-unreachable",
    ]
    with_endpoints = lines(ServicePort(NAME, "10.96.0.10", 80))
    assert len([ln for ln in with_endpoints if "KUBE-USERPROXY-FILTER" in ln]) == 1


def test_guard_packs_proxy_ports_fifteen_slots_per_rule_ranges_counting_two() -> None:
    rules = guard_rules("udp", [*range(100, 110), 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29])
    assert [r.dports for r in rules] == [
        "7,9,11,13,15,17,19,21,23,25,27,29,100:109",
    ]
    many = guard_rules("tcp", range(1000, 1032, 2))  # 16 lone ports
    assert [r.dports.count(",") + 1 for r in many if r.dports] == [15, 1]
    assert all(r.protocol == "tcp" and r.ctstate_not_dnat for r in many)


def test_hostile_names_cannot_break_a_batch() -> None:
    name = ServicePortName("ns", 'we"b\n-j ACCEPT', "http")
    (line,) = [ln for ln in lines(ServicePort(name, "10.96.0.10", 80)) if "PORTALS-HOST" in ln]
    assert "--comment ns/we_b_-j_ACCEPT:http " in line


def test_unchanged_ports_reuse_their_rules() -> None:
    builder = RuleBuilder(WILDCARD)
    entry = PortalPort(ServicePort(NAME, "10.96.0.10", 80), 40123, True)
    first = builder.build([entry]).rules("KUBE-PORTALS-HOST")[0]
    again = builder.build([entry]).rules("KUBE-PORTALS-HOST")[0]
    assert again is first
    moved = PortalPort(ServicePort(NAME, "10.96.0.11", 80), 40123, True)
    assert builder.build([moved]).rules("KUBE-PORTALS-HOST")[0].dst == "10.96.0.11/32"


def test_restore_batch_declares_every_chain_and_adds_missing_jumps() -> None:
    text = restore_text(build([], WILDCARD), add_jumps=JUMPS)
    nat = text.split("COMMIT\n")[1]
    assert nat.splitlines()[:5] == [
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


def test_filter_is_committed_before_nat() -> None:
    """A new proxy port's REJECT must exist before a nat rule can send clients to it."""
    text = restore_text(
        build([PortalPort(ServicePort(NAME, "10.96.0.10", 80), 1, False)], WILDCARD)
    )
    assert text.index("*filter") < text.index("COMMIT") < text.index("*nat")


GUARD, NON_LOCAL = "KUBE-USERPROXY-FILTER", "KUBE-NODEPORT-NON-LOCAL"
IN_ORDER = {
    ("nat", "PREROUTING"): ["KUBE-PORTALS-CONTAINER", "DOCKER", "KUBE-NODEPORT-CONTAINER"],
    ("nat", "OUTPUT"): ["KUBE-PORTALS-HOST", "KUBE-NODEPORT-HOST"],
    ("filter", "INPUT"): ["f2b-sshd", GUARD, NON_LOCAL, "ACCEPT"],
}


def targets(jumps: tuple[Jump, ...]) -> list[str]:
    return [j.rule.target.name for j in jumps]


def test_jumps_in_place_are_left_alone_even_below_foreign_rules() -> None:
    assert plan_jumps(IN_ORDER) == JumpPlan()


def test_every_jump_added_when_none_exist_guard_last_so_it_ends_on_top() -> None:
    plan = plan_jumps({})
    assert plan.remove == () and plan.add == JUMPS
    assert targets(plan.add)[-2:] == [NON_LOCAL, GUARD]


def test_re_adding_non_local_re_places_the_guard_above_it() -> None:
    plan = plan_jumps({**IN_ORDER, ("filter", "INPUT"): [GUARD]})
    assert targets(plan.remove) == [GUARD]
    assert targets(plan.add) == [NON_LOCAL, GUARD]


def test_guard_below_non_local_is_moved_up() -> None:
    plan = plan_jumps({**IN_ORDER, ("filter", "INPUT"): [NON_LOCAL, GUARD]})
    assert (targets(plan.remove), targets(plan.add)) == ([GUARD], [GUARD])


def test_a_missing_nodeport_jump_is_appended_without_touching_the_portal_jump() -> None:
    plan = plan_jumps({**IN_ORDER, ("nat", "OUTPUT"): ["KUBE-PORTALS-HOST"]})
    assert plan.remove == () and targets(plan.add) == ["KUBE-NODEPORT-HOST"]


def test_external_traffic_policy_local_sends_outside_traffic_to_the_external_port() -> None:
    port = ServicePort(NAME, "10.96.0.10", 80, node_port=30080, external_ips=("1.2.3.4",),
                       external_local=True)  # fmt: skip

    def built(has_local: bool) -> list[str]:
        entry = PortalPort(port, 40123, True, True, external_proxy_port=40124,
                           has_local_endpoints=has_local)  # fmt: skip
        ruleset = build([entry], WILDCARD)
        return [r.line for t in ("nat", "filter") for rs in ruleset.chains[t].values() for r in rs]

    got = built(True)
    container = [ln for ln in got if "-CONTAINER" in ln]
    host = [ln for ln in got if "-HOST" in ln]
    assert [ln.rsplit(" ", 1)[1] for ln in container] == ["40123", "40124", "40124", "40124"]
    assert all(ln.endswith(":40123") for ln in host)  # the node's own traffic: cluster-wide
    assert any("NON-LOCAL" in ln and "--dport 40124" in ln for ln in got)
    assert not any(ln.endswith("-j DROP") for ln in got)
    dropped = [ln for ln in built(False) if ln.endswith("-j DROP")]
    assert dropped == [
        "-A KUBE-USERPROXY-FILTER -m comment --comment ns/web:http -p tcp -m tcp --dport 40124 "
        "-j DROP"
    ]


def test_source_ranges_limit_who_the_load_balancer_portal_takes() -> None:
    port = ServicePort(NAME, "10.96.0.10", 80, load_balancer_ips=("5.6.7.8",),
                       source_ranges=("192.0.2.0/24", "198.51.100.7/32"))  # fmt: skip
    got = [ln for ln in lines(port) if "5.6.7.8" in ln]
    assert [ln.split(" -j ")[0].rsplit(" ", 2)[-2:] for ln in got if "CONTAINER" in ln] == [
        ["-s", "192.0.2.0/24"], ["-s", "198.51.100.7/32"],
    ]  # fmt: skip
    assert any("PORTALS-HOST" in ln and " -s " not in ln for ln in got)  # the node itself
    assert any(ln.startswith("-A KUBE-USERPROXY-FILTER") and ln.endswith("-j DROP") for ln in got)
