"""externalIPs are safe by default: never another Service's ClusterIP (whichever arrived
first), a node address only when allowed, and only inside the allow list when there is one."""

from __future__ import annotations

from userproxy.externalips import ExternalIPGuard, ExternalIPPolicy
from userproxy.model import ServicePort, ServicePortName

A, B = ("ns", "a"), ("ns", "b")


def ports(service: tuple[str, str], cluster_ip: str, *external: str) -> tuple[ServicePort, ...]:
    name = ServicePortName(*service, "http")
    return (ServicePort(name, cluster_ip, 80, external_ips=external),)


def served_external(emissions: list, service: tuple[str, str]) -> tuple[str, ...] | None:
    for e in emissions:
        if e.service == service:
            return e.ports[0].external_ips if e.ports else None
    return None


def test_another_services_cluster_ip_is_refused_whichever_came_first() -> None:
    guard = ExternalIPGuard()
    first = guard.update(A, ports(A, "10.96.0.1", "10.96.0.2", "192.0.2.50"))
    assert served_external(first, A) == ("10.96.0.2", "192.0.2.50")  # nobody owns .2 yet
    second = guard.update(B, ports(B, "10.96.0.2"))
    assert served_external(second, A) == ("192.0.2.50",)  # A re-evaluated when B arrived
    assert any("ClusterIP of Service ns/b" in p for e in second for p in e.problems)
    gone = guard.update(B, None)
    assert served_external(gone, A) == ("10.96.0.2", "192.0.2.50")


def test_a_service_may_list_its_own_cluster_ip() -> None:
    guard = ExternalIPGuard()
    [emission] = guard.update(A, ports(A, "10.96.0.1", "10.96.0.1"))
    assert emission.ports is not None and emission.ports[0].external_ips == ("10.96.0.1",)


def test_node_addresses_need_the_allow_list_and_the_list_limits_the_rest() -> None:
    node = frozenset({"192.0.2.2"})
    guard = ExternalIPGuard(ExternalIPPolicy(local_addresses=node))
    [emission] = guard.update(A, ports(A, "10.96.0.1", "192.0.2.2", "203.0.113.9"))
    assert emission.ports is not None and emission.ports[0].external_ips == ("203.0.113.9",)
    assert "address of this node" in emission.problems[0]
    allowed = guard.set_policy(ExternalIPPolicy(("192.0.2.0/24",), node))
    assert served_external(allowed, A) == ("192.0.2.2",)  # inside the list; 203.* is not
    assert guard.set_policy(ExternalIPPolicy(("192.0.2.0/24",), node)) == []  # no change


def test_problems_are_reported_once_and_services_without_external_ips_are_not_rechecked() -> None:
    guard = ExternalIPGuard()
    guard.update(A, ports(A, "10.96.0.1", "10.96.0.9"))
    first = guard.update(B, ports(B, "10.96.0.9"))
    again = guard.update(B, ports(B, "10.96.0.9"))  # B re-sent unchanged
    assert [len(e.problems) for e in first] == [0, 1]
    assert all(not e.problems for e in again)
    assert not guard.update(("ns", "c"), ports(("ns", "c"), "10.96.0.7"))[0].problems


def test_local_addresses_from_proc() -> None:
    from userproxy.localaddrs import parse_fib_trie, parse_if_inet6

    trie = """Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
        +-- 192.0.2.0/30 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
"""
    assert parse_fib_trie(trie) == {"127.0.0.1", "192.0.2.2"}
    inet6 = "fd000000000000000000000000000002 04 40 00 82     eth0\n"
    assert parse_if_inet6(inet6) == {"fd00::2"}
