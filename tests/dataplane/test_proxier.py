"""kube-proxy's userspace proxier_test.go scenarios, black-box through the embedding API and
real loopback sockets, plus what the old proxier left untested."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.conftest import loopback_settings
from tests.helpers import LOCAL, TcpBackend, open_fds, tcp_name, udp_ask, wait_for
from userproxy import UnknownServicePort, UserProxy
from userproxy.objects import endpoint_slice, service

NS, NAME, VIP = "testnamespace", "echo", "1.2.3.4"


def svc(*ports: tuple[str, int] | tuple[str, int, str], **kw: object) -> dict[str, object]:
    kw.setdefault("cluster_ip", VIP)
    return service(NAME, namespace=NS, ports=list(ports), **kw)  # type: ignore[arg-type]


def eps(*ports: tuple[str, int] | tuple[str, int, str], name: str = "echo-1") -> dict[str, object]:
    return endpoint_slice(NAME, namespace=NS, name=name, addresses=[LOCAL], ports=list(ports))


def tcp_port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((LOCAL, port)) != 0


async def test_tcp_proxy(proxy: UserProxy, backends: list[TcpBackend]) -> None:
    await proxy.apply(svc(("p", 80)), eps(("p", backends[0].port)))
    assert await tcp_name(proxy.proxy_port(f"{NS}/{NAME}:p")) == "pod1"


async def test_udp_proxy(proxy: UserProxy, udp_backend: int) -> None:
    await proxy.apply(svc(("p", 80, "UDP")), eps(("p", udp_backend, "UDP")))
    assert await udp_ask(proxy.proxy_port(f"{NS}/{NAME}:p"), b"abc123") == b"abc123"


async def test_udp_proxy_timeout(udp_backend: int) -> None:
    async with UserProxy(loopback_settings(udp_idle_timeout=0.25)) as proxy:
        await proxy.apply(svc(("p", 80, "UDP")), eps(("p", udp_backend, "UDP")))
        name = f"{NS}/{NAME}:p"
        assert await udp_ask(proxy.proxy_port(name), b"abc123") == b"abc123"
        assert proxy.counters(name).active == 1
        await wait_for(lambda: proxy.counters(name).active == 0, timeout=2, what="flow expiry")
        assert proxy.counters(name).total == 1


async def test_multi_port_same_number_different_protocols(
    proxy: UserProxy, backends: list[TcpBackend], udp_backend: int
) -> None:
    await proxy.apply(svc(("p", 80), ("q", 80, "UDP")))
    await proxy.apply(eps(("p", backends[0].port), name="a"))
    await proxy.apply(eps(("q", udp_backend, "UDP"), name="b"))
    assert await tcp_name(proxy.proxy_port(f"{NS}/{NAME}:p")) == "pod1"
    assert await udp_ask(proxy.proxy_port(f"{NS}/{NAME}:q"), b"abc123") == b"abc123"


async def test_multi_port_on_service_add_without_endpoints(proxy: UserProxy) -> None:
    await proxy.apply(svc(("p", 80), ("q", 81, "UDP")))
    served = {str(a.port.name): a for a in proxy.service_ports()}
    assert served.keys() == {f"{NS}/{NAME}:p", f"{NS}/{NAME}:q"}
    assert (served[f"{NS}/{NAME}:p"].port.cluster_ip, served[f"{NS}/{NAME}:p"].port.port) == (
        VIP,
        80,
    )
    assert served[f"{NS}/{NAME}:q"].port.port == 81
    assert not any(a.has_endpoints for a in served.values())
    with pytest.raises(UnknownServicePort):
        proxy.proxy_port(f"{NS}/{NAME}:x")


@pytest.mark.parametrize("protocol", ["TCP", "UDP"])
async def test_stop_closes_the_port_and_leaves_nothing(
    protocol: str, backends: list[TcpBackend], udp_backend: int
) -> None:
    tasks_before, fds_before = len(asyncio.all_tasks()), open_fds()
    async with UserProxy(loopback_settings()) as proxy:
        backend_port = backends[0].port if protocol == "TCP" else udp_backend
        await proxy.apply(svc(("p", 80, protocol)), eps(("p", backend_port, protocol)))
        port = proxy.proxy_port(f"{NS}/{NAME}:p")
        if protocol == "TCP":
            reader, writer = await asyncio.open_connection(LOCAL, port)
            assert await reader.readline() == b"pod1\n"
        else:
            assert await udp_ask(port, b"x") == b"x"
        await proxy.delete("Service", NAME, namespace=NS)
        with pytest.raises(UnknownServicePort):
            proxy.proxy_port(f"{NS}/{NAME}:p")
        if protocol == "TCP":
            assert tcp_port_closed(port)
            # The removed service's established connection is reset, not left dangling.
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 2)
            writer.close()
    await wait_for(lambda: open_fds() <= fds_before, what="fds released")
    assert len(asyncio.all_tasks()) == tasks_before


@pytest.mark.parametrize("protocol", ["TCP", "UDP"])
async def test_update_delete_update(
    proxy: UserProxy, protocol: str, backends: list[TcpBackend], udp_backend: int
) -> None:
    backend_port = backends[0].port if protocol == "TCP" else udp_backend
    await proxy.apply(svc(("p", 9997, protocol)), eps(("p", backend_port, protocol)))
    first = proxy.proxy_port(f"{NS}/{NAME}:p")
    await proxy.delete("Service", NAME, namespace=NS)
    if protocol == "TCP":
        assert tcp_port_closed(first)
    # The endpoints were never deleted: re-adding the Service is enough (the old proxier also
    # needed the Endpoints re-sent, because deleting the service dropped its balancer state).
    await proxy.apply(svc(("p", 9997, protocol)))
    port = proxy.proxy_port(f"{NS}/{NAME}:p")
    if protocol == "TCP":
        assert await tcp_name(port) == "pod1"
    else:
        assert await udp_ask(port, b"again") == b"again"


@pytest.mark.parametrize("protocol", ["TCP", "UDP"])
async def test_update_port_rebuilds_on_a_new_proxy_port(
    proxy: UserProxy, protocol: str, backends: list[TcpBackend], udp_backend: int
) -> None:
    backend_port = backends[0].port if protocol == "TCP" else udp_backend
    await proxy.apply(svc(("p", 99, protocol)), eps(("p", backend_port, protocol)))
    old = proxy.proxy_port(f"{NS}/{NAME}:p")
    await proxy.apply(svc(("p", 100, protocol)))
    (active,) = proxy.service_ports()
    assert active.port.port == 100 and active.proxy_port != old
    if protocol == "TCP":
        assert tcp_port_closed(old)
        assert await tcp_name(active.proxy_port) == "pod1"
    else:
        assert await udp_ask(active.proxy_port, b"new") == b"new"


async def test_update_public_ips_rebuilds(proxy: UserProxy, backends: list[TcpBackend]) -> None:
    await proxy.apply(svc(("p", 9997)), eps(("p", backends[0].port)))
    old = proxy.proxy_port(f"{NS}/{NAME}:p")
    reader, writer = await asyncio.open_connection(LOCAL, old)
    assert await reader.readline() == b"pod1\n"
    await proxy.apply(svc(("p", 9997), external_ips=["4.3.2.1"]))
    (active,) = proxy.service_ports()
    assert active.port.external_ips == ("4.3.2.1",) and active.proxy_port != old
    assert await tcp_name(active.proxy_port) == "pod1"
    # The connection made before the rebuild is still relayed.
    writer.write(b"still here")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 2) == b"still here"
    writer.close()


async def test_update_portal_clusterip_removed_headless_and_back(
    proxy: UserProxy, backends: list[TcpBackend]
) -> None:
    await proxy.apply(svc(("p", 9997)), eps(("p", backends[0].port)))
    await proxy.apply(svc(("p", 9997), cluster_ip=""))
    assert proxy.service_ports() == []
    await proxy.apply(svc(("p", 9997), cluster_ip="None"))
    assert proxy.service_ports() == []
    await proxy.apply(svc(("p", 9997)))
    assert await tcp_name(proxy.proxy_port(f"{NS}/{NAME}:p")) == "pod1"


async def test_affinity_timeout_change_keeps_the_listener(
    proxy: UserProxy, backends: list[TcpBackend]
) -> None:
    await proxy.apply(
        svc(("p", 80), session_affinity=True, affinity_timeout=100), eps(("p", backends[0].port))
    )
    port = proxy.proxy_port(f"{NS}/{NAME}:p")
    await proxy.apply(svc(("p", 80), session_affinity=True, affinity_timeout=5))
    assert proxy.proxy_port(f"{NS}/{NAME}:p") == port
    await proxy.apply(svc(("p", 80)))  # affinity type change: rebuilt
    assert proxy.proxy_port(f"{NS}/{NAME}:p") != port


async def test_round_robin_across_endpoints_and_affinity(
    proxy: UserProxy, backends: list[TcpBackend]
) -> None:
    slices = [eps(("p", b.port), name=b.name) for b in backends]
    await proxy.apply(svc(("p", 80)), *slices)
    port = proxy.proxy_port(f"{NS}/{NAME}:p")
    got = [await tcp_name(port) for _ in range(9)]
    assert sorted(got) == sorted(["pod1", "pod2", "pod3"] * 3)
    assert got[:3] == got[3:6] == got[6:]
    await proxy.apply(svc(("p", 80), session_affinity=True))
    port = proxy.proxy_port(f"{NS}/{NAME}:p")
    got = {await tcp_name(port) for _ in range(6)}
    assert len(got) == 1


async def test_established_connection_survives_endpoint_change(
    proxy: UserProxy, backends: list[TcpBackend]
) -> None:
    await proxy.apply(svc(("p", 80)), eps(("p", backends[0].port)))
    port = proxy.proxy_port(f"{NS}/{NAME}:p")
    reader, writer = await asyncio.open_connection(LOCAL, port)
    assert await reader.readline() == b"pod1\n"
    await proxy.apply(eps(("p", backends[1].port)))  # same slice, endpoint replaced
    assert await tcp_name(port) == "pod2"
    writer.write(b"ping")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 2) == b"ping"
    writer.close()


async def test_endpoints_before_service_and_terminating_fallback(
    proxy: UserProxy, backends: list[TcpBackend]
) -> None:
    ready = eps(("p", backends[0].port), name="a")
    terminating = eps(("p", backends[1].port), name="b")
    for ep in terminating["endpoints"]:  # type: ignore[union-attr]
        ep["conditions"] = {"ready": False, "serving": True, "terminating": True}
    await proxy.apply(ready, terminating)
    await proxy.apply(svc(("p", 80)))
    port = proxy.proxy_port(f"{NS}/{NAME}:p")
    assert {await tcp_name(port) for _ in range(4)} == {"pod1"}
    await proxy.delete("EndpointSlice", "a", namespace=NS)
    assert {await tcp_name(port) for _ in range(2)} == {"pod2"}


async def test_bad_service_is_refused_and_others_keep_working(
    proxy: UserProxy, backends: list[TcpBackend]
) -> None:
    bad = service("bad", namespace=NS, cluster_ip="10.96.0.300", ports=[("p", 80)])
    await proxy.apply(bad, svc(("p", 80)), eps(("p", backends[0].port)))
    assert proxy.router.rejected == 1
    assert await tcp_name(proxy.proxy_port(f"{NS}/{NAME}:p")) == "pod1"


async def test_proxy_port_range_is_used_and_released(backends: list[TcpBackend]) -> None:
    with socket.socket() as probe:
        probe.bind((LOCAL, 0))
        base = probe.getsockname()[1]
    from userproxy.ports import PortRange

    async with UserProxy(loopback_settings(port_range=PortRange(base, 1))) as proxy:
        await proxy.apply(svc(("p", 80)), eps(("p", backends[0].port)))
        assert proxy.proxy_port(f"{NS}/{NAME}:p") == base
        await proxy.apply(service("other", namespace=NS, cluster_ip="10.0.0.2", ports=[("p", 1)]))
        assert [str(a.port.name) for a in proxy.service_ports()] == [f"{NS}/{NAME}:p"]
        assert "in use" in proxy.status().failed[0][1]
        await proxy.delete("Service", NAME, namespace=NS)
        # The port is free again: the service port that could not have it is retried at the
        # next sync without any change to its Service.
        assert proxy.proxy_port(f"{NS}/other:p") == base
        assert proxy.status().failed == ()
        await proxy.delete("Service", "other", namespace=NS)
        await proxy.apply(svc(("p", 80)))
        assert proxy.proxy_port(f"{NS}/{NAME}:p") == base


async def test_refused_objects_are_listed_in_the_status_until_fixed(proxy: UserProxy) -> None:
    from userproxy.serving.status import render, to_json

    bad = service("bad", namespace=NS, cluster_ip="10.96.0.300", ports=[("p", 80)])
    await proxy.apply(bad)
    [refused] = proxy.status().refused
    assert (refused.kind, refused.namespace, refused.name) == ("Service", NS, "bad")
    assert "10.96.0.300" in refused.reason and refused.origin == "UserProxy.apply"
    assert f"!    Service {NS}/bad: refused:" in render(to_json(proxy.status()))
    await proxy.apply(service("bad", namespace=NS, cluster_ip="10.96.0.30", ports=[("p", 80)]))
    assert proxy.status().refused == ()


async def test_node_ports_outside_the_range_are_refused_and_the_rest_served(
    proxy: UserProxy,
) -> None:
    await proxy.apply(
        service(
            "np",
            namespace=NS,
            cluster_ip="10.96.0.31",
            ports=[{"name": "ssh", "port": 80, "nodePort": 22}],
        )
    )
    [status] = [s for s in proxy.service_ports() if s.name.name == "np"]
    assert status.port.node_port == 0 and status.proxy_port
