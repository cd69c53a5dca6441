"""The round-robin scenarios of kube-proxy's roundrobin_test.go (reference section 5), with their
exact sequences, plus the affinity-timeout behaviour the old proxier got wrong (#107398)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from userproxy.balancer import MissingService, NoEndpoints, RoundRobinBalancer
from userproxy.model import Affinity, Endpoint, ServicePortName

FOO_P = ServicePortName("testnamespace", "foo", "p")
FOO_Q = ServicePortName("testnamespace", "foo", "q")
BAR_P = ServicePortName("testnamespace", "bar", "p")
STICKY = Affinity(client_ip=True, timeout_s=10800)


def ep(host: str, port: int) -> Endpoint:
    return Endpoint(host, port)


@pytest.fixture
def lb() -> RoundRobinBalancer:
    return RoundRobinBalancer(shuffle=random.Random(7).shuffle)


def picks(
    lb: RoundRobinBalancer, name: ServicePortName, n: int, client: str = ""
) -> list[Endpoint]:
    return [lb.next_endpoint(name, client, now=0) for _ in range(n)]


def test_endpoint_validity_is_checked_by_the_converter() -> None:
    # TestValidateWorks / TestFilterWorks: invalid hosts and ports never reach the balancer.
    from userproxy.convert import InvalidObject, endpoint_slice
    from userproxy.objects import endpoint_slice as build

    with pytest.raises(InvalidObject, match="port"):
        endpoint_slice(build("foo", addresses=["10.0.0.1"], ports=[("p", 0)]))
    with pytest.raises(InvalidObject, match="not an IP"):
        endpoint_slice(build("foo", addresses=[""], ports=[("p", 80)]))


def test_fails_with_no_endpoints(lb: RoundRobinBalancer) -> None:
    with pytest.raises(MissingService):
        lb.next_endpoint(FOO_P, "", now=0)
    lb.update_endpoints(FOO_P, [])
    with pytest.raises(NoEndpoints):
        lb.next_endpoint(FOO_P, "", now=0)


def test_single_endpoint(lb: RoundRobinBalancer) -> None:
    with pytest.raises(MissingService):
        lb.next_endpoint(FOO_P, "", now=0)
    lb.update_endpoints(FOO_P, [ep("endpoint1", 40)])
    assert picks(lb, FOO_P, 4) == [ep("endpoint1", 40)] * 4


def test_multiple_endpoints_follow_the_shuffled_list(lb: RoundRobinBalancer) -> None:
    endpoints = [ep("endpoint", 1), ep("endpoint", 2), ep("endpoint", 3)]
    lb.update_endpoints(FOO_P, endpoints)
    order = lb.endpoints(FOO_P)
    assert sorted(order) == endpoints
    assert picks(lb, FOO_P, 4) == [order[0], order[1], order[2], order[0]]


def test_multiple_endpoints_multiple_ports_cycle_independently(lb: RoundRobinBalancer) -> None:
    lb.update_endpoints(FOO_P, [ep("e1", 1), ep("e2", 1), ep("e3", 3)])
    lb.update_endpoints(FOO_Q, [ep("e1", 2), ep("e2", 2), ep("e3", 4)])
    p, q = lb.endpoints(FOO_P), lb.endpoints(FOO_Q)
    assert set(p) == {ep("e1", 1), ep("e2", 1), ep("e3", 3)}
    assert set(q) == {ep("e1", 2), ep("e2", 2), ep("e3", 4)}
    assert picks(lb, FOO_P, 2) == [p[0], p[1]]
    assert picks(lb, FOO_Q, 4) == [q[0], q[1], q[2], q[0]]
    assert picks(lb, FOO_P, 2) == [p[2], p[0]]


def test_multiple_endpoints_and_updates_restart_at_the_new_list(lb: RoundRobinBalancer) -> None:
    lb.update_endpoints(FOO_P, [ep("e1", 1), ep("e2", 1), ep("e3", 3)])
    lb.update_endpoints(FOO_Q, [ep("e1", 2), ep("e2", 2), ep("e3", 4)])
    for name in (FOO_P, FOO_Q):
        order = lb.endpoints(name)
        assert picks(lb, name, 4) == [order[0], order[1], order[2], order[0]]
    lb.update_endpoints(FOO_P, [ep("e4", 4), ep("e5", 5)])
    lb.update_endpoints(FOO_Q, [ep("e4", 6), ep("e5", 7)])
    for name in (FOO_P, FOO_Q):
        order = lb.endpoints(name)
        assert picks(lb, name, 4) == [order[0], order[1], order[0], order[1]]
    lb.update_endpoints(FOO_P, [])
    with pytest.raises(NoEndpoints):
        lb.next_endpoint(FOO_P, "", now=0)


def test_same_set_in_another_order_keeps_order_and_position(lb: RoundRobinBalancer) -> None:
    endpoints = [ep("e", 1), ep("e", 2), ep("e", 3)]
    lb.update_endpoints(FOO_P, endpoints)
    order = lb.endpoints(FOO_P)
    first = picks(lb, FOO_P, 1)
    assert lb.update_endpoints(FOO_P, list(reversed(endpoints))) is False
    assert lb.endpoints(FOO_P) == order
    assert first + picks(lb, FOO_P, 2) == list(order)


def test_service_removal_leaves_other_services_where_they_were(lb: RoundRobinBalancer) -> None:
    lb.update_endpoints(FOO_P, [ep("e", 1), ep("e", 2), ep("e", 3)])
    lb.update_endpoints(BAR_P, [ep("e", 4), ep("e", 5), ep("e", 6)])
    foo, bar = lb.endpoints(FOO_P), lb.endpoints(BAR_P)
    assert picks(lb, FOO_P, 5) == [foo[0], foo[1], foo[2], foo[0], foo[1]]
    assert picks(lb, BAR_P, 5) == [bar[0], bar[1], bar[2], bar[0], bar[1]]
    lb.update_endpoints(FOO_P, [])  # foo's Endpoints deleted
    with pytest.raises(NoEndpoints):
        lb.next_endpoint(FOO_P, "", now=0)
    assert picks(lb, BAR_P, 4) == [bar[2], bar[0], bar[1], bar[2]]


@pytest.mark.parametrize("service_first", [True, False])
def test_sticky_pins_each_client_whatever_arrives_first(
    lb: RoundRobinBalancer, service_first: bool
) -> None:
    endpoints = [ep("endpoint", 1), ep("endpoint", 2), ep("endpoint", 3)]
    if service_first:
        lb.set_affinity(FOO_P, STICKY)
        lb.update_endpoints(FOO_P, endpoints)
    else:
        lb.update_endpoints(FOO_P, endpoints[:2])
        lb.set_affinity(FOO_P, STICKY)
    order = lb.endpoints(FOO_P)
    c1 = lb.next_endpoint(FOO_P, "127.0.0.1", now=0)
    c2 = lb.next_endpoint(FOO_P, "127.0.0.2", now=0)
    c3 = lb.next_endpoint(FOO_P, "127.0.0.3", now=0)
    assert [c1, c2, c3] == [order[0], order[1 % len(order)], order[2 % len(order)]]
    for _ in range(3):  # interleaved, each client stays on its endpoint
        assert lb.next_endpoint(FOO_P, "127.0.0.1", now=1) == c1
        assert lb.next_endpoint(FOO_P, "127.0.0.3", now=1) == c3
        assert lb.next_endpoint(FOO_P, "127.0.0.2", now=1) == c2


def test_sticky_with_one_endpoint_removed_then_another_added(lb: RoundRobinBalancer) -> None:
    lb.set_affinity(FOO_P, STICKY)
    lb.update_endpoints(FOO_P, [ep("endpoint", 1), ep("endpoint", 2), ep("endpoint", 3)])
    order = lb.endpoints(FOO_P)
    clients = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    pinned = {c: lb.next_endpoint(FOO_P, c, now=0) for c in clients}
    assert list(pinned.values()) == list(order)
    lost = next(c for c, e in pinned.items() if e == ep("endpoint", 3))
    lb.update_endpoints(FOO_P, [ep("endpoint", 1), ep("endpoint", 2)])
    new_order = lb.endpoints(FOO_P)
    for c in clients:
        expected = new_order[0] if c == lost else pinned[c]
        assert lb.next_endpoint(FOO_P, c, now=1) == expected
    pinned = {c: lb.next_endpoint(FOO_P, c, now=1) for c in clients}
    lb.update_endpoints(FOO_P, [ep("endpoint", 1), ep("endpoint", 2), ep("endpoint", 4)])
    order = lb.endpoints(FOO_P)
    for c in clients:
        assert lb.next_endpoint(FOO_P, c, now=2) == pinned[c]
    newcomers = [lb.next_endpoint(FOO_P, c, now=2) for c in ("127.0.0.4", "127.0.0.5", "127.0.0.6")]
    assert newcomers == list(order)


def test_sticky_with_all_endpoints_replaced(lb: RoundRobinBalancer) -> None:
    lb.set_affinity(FOO_P, STICKY)
    lb.update_endpoints(FOO_P, [ep("endpoint", 1), ep("endpoint", 2), ep("endpoint", 3)])
    order = lb.endpoints(FOO_P)
    for _ in range(2):
        assert lb.next_endpoint(FOO_P, "127.0.0.1", now=0) == order[0]
        assert lb.next_endpoint(FOO_P, "127.0.0.2", now=0) == order[1]
    lb.update_endpoints(FOO_P, [ep("endpoint", 4), ep("endpoint", 5)])
    assert lb.sessions(FOO_P) == {}
    order = lb.endpoints(FOO_P)
    assert lb.next_endpoint(FOO_P, "127.0.0.1", now=1) == order[0]
    assert lb.next_endpoint(FOO_P, "127.0.0.2", now=1) == order[1]
    assert lb.next_endpoint(FOO_P, "127.0.0.1", now=1) == order[0]
    lb.update_endpoints(FOO_P, [])
    with pytest.raises(NoEndpoints):
        lb.next_endpoint(FOO_P, "127.0.0.1", now=1)


def test_sticky_service_removal_keeps_the_other_services_pins(lb: RoundRobinBalancer) -> None:
    lb.set_affinity(FOO_P, STICKY)
    lb.set_affinity(BAR_P, STICKY)
    lb.update_endpoints(FOO_P, [ep("endpoint", 1), ep("endpoint", 2), ep("endpoint", 3)])
    lb.update_endpoints(BAR_P, [ep("endpoint", 4), ep("endpoint", 5)])
    foo, bar = lb.endpoints(FOO_P), lb.endpoints(BAR_P)
    for _ in range(2):
        assert lb.next_endpoint(FOO_P, "127.0.0.1", now=0) == foo[0]
        assert lb.next_endpoint(FOO_P, "127.0.0.2", now=0) == foo[1]
        assert lb.next_endpoint(BAR_P, "127.0.0.1", now=0) == bar[0]
        assert lb.next_endpoint(BAR_P, "127.0.0.2", now=0) == bar[1]
    lb.update_endpoints(FOO_P, [])
    with pytest.raises(NoEndpoints):
        lb.next_endpoint(FOO_P, "127.0.0.1", now=0)
    assert lb.next_endpoint(BAR_P, "127.0.0.1", now=0) == bar[0]
    assert lb.next_endpoint(BAR_P, "127.0.0.2", now=0) == bar[1]


def test_sticky_with_endpoint_failures_follows_the_exact_sequence() -> None:
    # TestStickyLoadBalanceWorksWithEndpointFails, with the list order fixed to ep1, ep2, ep3.
    lb = RoundRobinBalancer(shuffle=lambda endpoints: endpoints.sort())
    e1, e2, e3 = ep("endpoint", 1), ep("endpoint", 2), ep("endpoint", 3)
    lb.set_affinity(FOO_P, STICKY)
    lb.update_endpoints(FOO_P, [e3, e1, e2])
    c1, c2, c3 = "127.0.0.1", "127.0.0.2", "127.0.0.3"
    assert [lb.next_endpoint(FOO_P, c, now=0) for c in (c1, c2, c3)] == [e1, e2, e3]

    def reset(client: str) -> Endpoint:
        return lb.next_endpoint(FOO_P, client, now=0, reset=True)

    assert [reset(c1), reset(c1), reset(c1)] == [e1, e2, e3]
    assert lb.next_endpoint(FOO_P, c2, now=0) == e2
    assert [reset(c2), reset(c3), reset(c1), reset(c2), reset(c3)] == [e1, e2, e3, e1, e2]


def test_delete_service_forgets_it(lb: RoundRobinBalancer) -> None:
    lb.update_endpoints(FOO_P, [ep("e", 1)])
    lb.delete_service(FOO_P)
    with pytest.raises(MissingService):
        lb.next_endpoint(FOO_P, "", now=0)


# ----------------------------------------------------------------------------- affinity timeout
def test_custom_timeout_holds_when_endpoints_arrive_before_the_service(
    lb: RoundRobinBalancer,
) -> None:
    lb.update_endpoints(FOO_P, [ep("e", 1), ep("e", 2)])
    lb.set_affinity(FOO_P, Affinity(client_ip=True, timeout_s=30))
    first = lb.next_endpoint(FOO_P, "10.0.0.1", now=100)
    assert lb.next_endpoint(FOO_P, "10.0.0.1", now=129.9) == first  # sliding window refreshed
    assert lb.next_endpoint(FOO_P, "10.0.0.1", now=159.5) == first
    # 30 s idle: the pin has expired and the client takes the next endpoint in turn.
    assert lb.next_endpoint(FOO_P, "10.0.0.1", now=190) != first


def test_changing_only_the_timeout_takes_effect(lb: RoundRobinBalancer) -> None:
    lb.set_affinity(FOO_P, STICKY)
    lb.update_endpoints(FOO_P, [ep("e", 1), ep("e", 2)])
    lb.next_endpoint(FOO_P, "10.0.0.1", now=0)
    lb.set_affinity(FOO_P, Affinity(client_ip=True, timeout_s=5))
    assert lb.cleanup_stale_sessions(now=4) == 0
    assert lb.cleanup_stale_sessions(now=5) == 1
    assert lb.sessions(FOO_P) == {}


def test_turning_affinity_off_drops_pins(lb: RoundRobinBalancer) -> None:
    lb.set_affinity(FOO_P, STICKY)
    lb.update_endpoints(FOO_P, [ep("e", 1), ep("e", 2)])
    lb.next_endpoint(FOO_P, "10.0.0.1", now=0)
    lb.set_affinity(FOO_P, Affinity())
    assert lb.sessions(FOO_P) == {}
    order = lb.endpoints(FOO_P)
    assert picks(lb, FOO_P, 2, client="10.0.0.1") == [order[1], order[0]]


# ----------------------------------------------------------------------------- properties
endpoint_sets = st.sets(
    st.builds(Endpoint, st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3"]), st.integers(1, 4)),
    min_size=1,
    max_size=12,
)


@given(endpoints=endpoint_sets, rounds=st.integers(1, 5), seed=st.integers())
def test_round_robin_is_exactly_fair(endpoints: set[Endpoint], rounds: int, seed: int) -> None:
    lb = RoundRobinBalancer(shuffle=random.Random(seed).shuffle)
    lb.update_endpoints(FOO_P, endpoints)
    got = picks(lb, FOO_P, rounds * len(endpoints))
    assert all(got.count(e) == rounds for e in endpoints)


@given(
    updates=st.lists(endpoint_sets, min_size=1, max_size=6),
    clients=st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=30),
)
def test_pins_never_point_at_removed_endpoints(
    updates: list[set[Endpoint]], clients: list[str]
) -> None:
    lb = RoundRobinBalancer()
    lb.set_affinity(FOO_P, STICKY)
    for now, endpoints in enumerate(updates):
        lb.update_endpoints(FOO_P, endpoints)
        for client in clients:
            assert lb.next_endpoint(FOO_P, client, now=now) in endpoints
        assert set(lb.sessions(FOO_P).values()) <= endpoints


# ---------------------------------------------------------------- loopback endpoints
NODE_LO = ep("127.0.0.1", 8080)
POD = ep("10.244.0.3", 8080)


def node_clients(lb_shuffle: random.Random) -> RoundRobinBalancer:
    return RoundRobinBalancer(
        shuffle=lb_shuffle.shuffle, is_node_client=lambda ip: ip in ("127.0.0.1", "192.168.50.1")
    )


def test_remote_clients_never_get_a_loopback_endpoint() -> None:
    lb = node_clients(random.Random(1))
    lb.update_endpoints(FOO_P, [NODE_LO, POD])
    assert set(picks(lb, FOO_P, 10, client="10.244.0.2")) == {POD}
    assert set(picks(lb, FOO_P, 10, client="192.168.50.1")) == {NODE_LO, POD}


def test_only_loopback_endpoints_means_none_for_remote_clients() -> None:
    lb = node_clients(random.Random(1))
    lb.update_endpoints(FOO_P, [NODE_LO])
    with pytest.raises(NoEndpoints):
        lb.next_endpoint(FOO_P, "10.244.0.2", now=0)
    assert lb.next_endpoint(FOO_P, "127.0.0.1", now=0) == NODE_LO


def test_affinity_never_pins_a_remote_client_to_loopback() -> None:
    lb = node_clients(random.Random(3))
    lb.set_affinity(FOO_P, STICKY)
    lb.update_endpoints(FOO_P, [NODE_LO, POD, ep("10.244.0.4", 8080)])
    first = lb.next_endpoint(FOO_P, "10.244.0.2", now=0)
    assert first != NODE_LO
    assert picks(lb, FOO_P, 5, client="10.244.0.2") == [first] * 5
    assert lb.next_endpoint(FOO_P, "10.244.0.2", now=0, reset=True) not in (NODE_LO, first)


@given(st.lists(st.sampled_from([NODE_LO, POD, ep("10.244.0.4", 1), ep("127.0.0.2", 1)]),
                min_size=1), st.integers(0, 2**32))  # fmt: skip
def test_the_default_lets_only_loopback_clients_use_loopback(
    endpoints: list[Endpoint], seed: int
) -> None:
    lb = RoundRobinBalancer(shuffle=random.Random(seed).shuffle)
    lb.update_endpoints(FOO_P, endpoints)
    remote = [e for e in set(endpoints) if not e.ip.startswith("127.")]
    if not remote:
        with pytest.raises(NoEndpoints):
            lb.next_endpoint(FOO_P, "10.0.0.1", now=0)
        return
    assert set(picks(lb, FOO_P, 2 * len(endpoints), client="10.0.0.1")) == set(remote)
