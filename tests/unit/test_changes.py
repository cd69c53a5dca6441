"""Change collapsing (kube-proxy's TestOnServiceAddChangeMap) and the endpoints cache."""

from __future__ import annotations

from userproxy.changes import EndpointsCache, ServiceChangeTracker
from userproxy.convert import endpoint_slice
from userproxy.model import Endpoint, ServicePort, ServicePortName
from userproxy.objects import endpoint_slice as build_slice

KEY = ("testnamespace", "echo")


def ports(ip: str) -> tuple[ServicePort, ...]:
    return (ServicePort(ServicePortName(*KEY, "p"), cluster_ip=ip, port=80),)


A, B, C = ports("10.0.0.1"), ports("10.0.0.2"), ports("10.0.0.3")


def test_add() -> None:
    t = ServiceChangeTracker()
    t.record(KEY, A)
    assert t.take() == {KEY: (None, A)}


def test_add_then_update() -> None:
    t = ServiceChangeTracker()
    t.record(KEY, A)
    t.record(KEY, B)
    assert t.pending == 1
    assert t.take() == {KEY: (None, B)}


def test_add_then_delete_leaves_nothing() -> None:
    t = ServiceChangeTracker()
    t.record(KEY, A)
    t.record(KEY, None)
    assert t.pending == 0
    assert t.take() == {}


def test_two_updates_collapse() -> None:
    t = ServiceChangeTracker()
    t.record(KEY, A)
    t.take()
    t.record(KEY, B)
    t.record(KEY, C)
    assert t.take() == {KEY: (A, C)}


def test_update_then_delete() -> None:
    t = ServiceChangeTracker()
    t.record(KEY, A)
    t.take()
    t.record(KEY, B)
    t.record(KEY, None)
    assert t.take() == {KEY: (A, None)}


def test_delete_then_add() -> None:
    t = ServiceChangeTracker()
    t.record(KEY, A)
    t.take()
    t.record(KEY, None)
    t.record(KEY, B)
    assert t.take() == {KEY: (A, B)}


def test_back_to_the_applied_state_is_no_change() -> None:
    t = ServiceChangeTracker()
    t.record(KEY, A)
    t.take()
    t.record(KEY, B)
    t.record(KEY, A)
    assert t.take() == {}


def test_endpoints_merge_across_slices_and_disappear_with_them() -> None:
    cache = EndpointsCache()
    name = ServicePortName(*KEY, "p")
    cache.update(
        endpoint_slice(
            build_slice(
                "echo", namespace=KEY[0], name="s1", addresses=["10.0.0.1"], ports=[("p", 80)]
            )
        )
    )
    cache.update(
        endpoint_slice(
            build_slice(
                "echo",
                namespace=KEY[0],
                name="s2",
                addresses=["10.0.0.2", "10.0.0.1"],
                ports=[("p", 80)],
            )
        )
    )
    assert cache.endpoints(name) == [Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80)]
    assert cache.port_names(KEY) == {name}
    cache.delete(KEY, "s2")
    assert cache.endpoints(name) == [Endpoint("10.0.0.1", 80)]
    cache.delete(KEY, "s1")
    assert cache.endpoints(name) == [] and cache.port_names(KEY) == set()
