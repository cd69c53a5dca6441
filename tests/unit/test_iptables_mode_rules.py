"""The iptables-mode rule builder: kube-proxy's chain names, probabilities and shapes."""

from __future__ import annotations

from userproxy.iptables.rule import Ruleset
from userproxy.iptables.text import chains_text
from userproxy.iptables_mode import rules
from userproxy.model import Affinity, Endpoint, Protocol, ServicePort, ServicePortName

NAME = ServicePortName("ns1", "svc1", "p80")
PORT = ServicePort(NAME, "172.30.0.41", 80, node_port=30080)
EPS = tuple(Endpoint(f"10.180.0.{i}", 80) for i in (1, 2, 3))


def lines(rs: Ruleset, table: str, chain: str) -> list[str]:
    return [rule.line for rule in rs.chains[table][chain]]


def test_chain_names_are_kube_proxys_stable_hashes() -> None:
    # The same names kube-proxy's own tests expect for ns1/svc1:p80 and 10.180.0.1:80.
    assert rules.service_chain(PORT) == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert rules.endpoint_chain(PORT, EPS[0]) == "KUBE-SEP-SXIVWICOYRO3J4NJ"
    udp = ServicePort(ServicePortName("ns1", "svc1", "p80", Protocol.UDP), "172.30.0.41", 80)
    assert rules.service_chain(udp) != rules.service_chain(PORT)


def test_even_spread_one_over_n_down_the_chain() -> None:
    rs = rules.build([rules.Backed(PORT, EPS)])
    svc = lines(rs, "nat", rules.service_chain(PORT))
    assert ["--probability 0.3333333333" in svc[0], "--probability 0.5000000000" in svc[1]] == [
        True,
        True,
    ]
    assert "statistic" not in svc[2] and svc[2].endswith(rules.endpoint_chain(PORT, EPS[2]))
    sep = lines(rs, "nat", rules.endpoint_chain(PORT, EPS[0]))
    assert sep == [
        f"-A {rules.endpoint_chain(PORT, EPS[0])} -m comment --comment ns1/svc1:p80 "
        "-s 10.180.0.1/32 -j KUBE-MARK-MASQ",
        f"-A {rules.endpoint_chain(PORT, EPS[0])} -m comment --comment ns1/svc1:p80 "
        "-p tcp -m tcp -j DNAT --to-destination 10.180.0.1:80",
    ]


def test_cluster_ip_and_node_port_entries() -> None:
    rs = rules.build([rules.Backed(PORT, EPS)])
    services = lines(rs, "nat", "KUBE-SERVICES")
    assert services[0] == (
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -d 172.30.0.41/32 '
        "-p tcp -m tcp --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O"
    )
    assert services[-1].endswith("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
    assert lines(rs, "nat", "KUBE-NODEPORTS") == [
        "-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -p tcp -m tcp --dport 30080 "
        "-j KUBE-MARK-MASQ",
        "-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -p tcp -m tcp --dport 30080 "
        "-j KUBE-SVC-XPGD46QRK7WJZT7O",
    ]
    assert lines(rs, "nat", "KUBE-POSTROUTING")[-1].endswith("-j MASQUERADE --random-fully")


def test_external_ips_are_masqueraded_and_no_endpoints_rejected_in_filter() -> None:
    port = ServicePort(NAME, "172.30.0.41", 80, node_port=30080, external_ips=("1.2.3.4",))
    rs = rules.build([rules.Backed(port, EPS)])
    ext = [ln for ln in lines(rs, "nat", "KUBE-SERVICES") if "1.2.3.4" in ln]
    assert [ln.rsplit(" ", 1)[1] for ln in ext] == ["KUBE-MARK-MASQ", "KUBE-SVC-XPGD46QRK7WJZT7O"]
    empty = rules.build([rules.Backed(port, ())])
    assert rules.service_chain(port) not in empty.chains["nat"]
    rejects = lines(empty, "filter", "KUBE-SERVICES")
    assert len(rejects) == 2 and all("-j REJECT" in r for r in rejects)
    assert "--dport 30080" in lines(empty, "filter", "KUBE-EXTERNAL-SERVICES")[0]


def test_client_ip_affinity_uses_recent_with_the_timeout() -> None:
    port = ServicePort(NAME, "172.30.0.41", 80, affinity=Affinity(client_ip=True, timeout_s=600))
    rs = rules.build([rules.Backed(port, EPS[:2])])
    svc = lines(rs, "nat", rules.service_chain(port))
    sep0 = rules.endpoint_chain(port, EPS[0])
    assert (
        f"-m recent --name {sep0} --mask 255.255.255.255 --rsource --rcheck --seconds 600 "
        f"--reap -j {sep0}" in svc[0]
    )
    assert "--set" in lines(rs, "nat", sep0)[1]


def test_restore_text_rewrites_only_changed_chains_and_deletes_stale_ones() -> None:
    before = rules.build([rules.Backed(PORT, EPS)])
    after = rules.build([rules.Backed(PORT, EPS[:2])])
    text = chains_text(
        after, before, {"nat": set(before.chains["nat"]), "filter": set()}, rules.owned
    )
    gone = rules.endpoint_chain(PORT, EPS[2])
    assert f":{rules.service_chain(PORT)} - [0:0]" in text
    assert f"-X {gone}" in text and text.index(f":{gone}") < text.index(f"-X {gone}")
    assert rules.endpoint_chain(PORT, EPS[0]) not in text.split("*nat")[1].split("\n")[1]
    assert ":KUBE-SERVICES" not in text  # unchanged: left alone
    assert chains_text(after, after, {"nat": set(after.chains["nat"])}, rules.owned) == ""


def test_external_traffic_policy_local_has_kube_proxys_ext_and_svl_chains() -> None:
    port = ServicePort(NAME, "172.30.0.41", 80, node_port=30080, external_ips=("192.168.99.1",),
                       external_local=True)  # fmt: skip
    rs = rules.build([rules.Backed(port, EPS, local_endpoints=EPS[:1])])
    ext, svl = rules.external_chain(port), rules.local_chain(port)
    assert ext.startswith("KUBE-EXT-") and svl.startswith("KUBE-SVL-")
    services = lines(rs, "nat", "KUBE-SERVICES")
    assert any("172.30.0.41/32" in ln and ln.endswith(rules.service_chain(port)) for ln in services)
    assert any("192.168.99.1/32" in ln and ln.endswith(ext) for ln in services)
    assert not any("192.168.99.1/32" in ln and "MARK-MASQ" in ln for ln in services)
    assert lines(rs, "nat", "KUBE-NODEPORTS")[-1].endswith(ext)
    assert [ln.rsplit(" ", 1)[1] for ln in lines(rs, "nat", ext)] == [
        "KUBE-MARK-MASQ", rules.service_chain(port), svl,
    ]  # fmt: skip
    assert lines(rs, "nat", svl) == [
        f'-A {svl} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" '
        f"-j {rules.endpoint_chain(port, EPS[0])}"
    ]
    none_here = rules.build([rules.Backed(port, EPS, local_endpoints=())])
    drops = lines(none_here, "filter", "KUBE-EXTERNAL-SERVICES")
    assert len(drops) == 2 and all(ln.endswith("-j DROP") for ln in drops)
    assert ext not in none_here.chains["nat"]


def test_source_ranges_go_through_a_firewall_chain_and_the_rest_is_dropped() -> None:
    port = ServicePort(NAME, "172.30.0.41", 80, load_balancer_ips=("1.2.3.4",),
                       source_ranges=("203.0.113.0/25",))  # fmt: skip
    rs = rules.build([rules.Backed(port, EPS)])
    fw = rules.firewall_chain(port)
    assert fw.startswith("KUBE-FW-")
    assert any("1.2.3.4/32" in ln and ln.endswith(fw) for ln in lines(rs, "nat", "KUBE-SERVICES"))
    assert [ln.split(" -j ")[1] for ln in lines(rs, "nat", fw)] == [
        "KUBE-MARK-MASQ", rules.service_chain(port),
    ]  # fmt: skip
    assert all("-s 203.0.113.0/25" in ln for ln in lines(rs, "nat", fw))
    (drop,) = lines(rs, "filter", "KUBE-EXTERNAL-SERVICES")
    assert "1.2.3.4/32" in drop and drop.endswith("-j DROP")
