"""The Kubernetes source in process: the real kubernetes-asyncio client against the fake API
server over HTTP, feeding a loopback UserProxy with real backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import loopback_settings
from tests.fakekube import FakeKube
from tests.helpers import TcpBackend, tcp_name, wait_for
from userproxy import UserProxy
from userproxy.objects import endpoint_slice, service
from userproxy.sources import kube

FAST = kube.Timeouts(watch=30, backoff_initial=0.05, backoff_max=0.3, request=5)
WEB = "default/web:http"


@dataclass
class Rig:
    fake: FakeKube
    proxy: UserProxy
    source: kube.KubeSource
    watching: asyncio.Task[None]

    def served(self, name: str = WEB) -> bool:
        return any(str(p.port.name) == name for p in self.proxy.service_ports())


async def start_rig(
    fake: FakeKube, tmp_path: Path, *, proxy_name: str | None = None, node: str = "node-a"
) -> Rig:
    proxy = UserProxy(loopback_settings(node_name=node), proxy_name=proxy_name)
    api = await kube.api_client(str(fake.kubeconfig(tmp_path / "kubeconfig")), None)
    source = kube.KubeSource(
        api, proxy.router, on_change=proxy.runner.request, proxy_name=proxy_name, timeouts=FAST
    )
    await source.initial_list()
    await proxy.start()
    watching = asyncio.get_running_loop().create_task(source.watch())
    return Rig(fake, proxy, source, watching)


async def stop_rig(rig: Rig) -> None:
    rig.watching.cancel()
    with pytest.raises(asyncio.CancelledError):
        await rig.watching
    await rig.proxy.stop()
    await rig.source.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeKube]:
    async with FakeKube() as f:
        yield f


@pytest.fixture
async def rig(fake: FakeKube, tmp_path: Path) -> AsyncIterator[Rig]:
    r = await start_rig(fake, tmp_path)
    yield r
    await stop_rig(r)


def web(**kw: Any) -> dict[str, Any]:
    return service("web", cluster_ip="10.96.0.10", ports=[("http", 80)], **kw)


def web_slice(
    *backends: TcpBackend, name: str = "web-1", node: str | None = None
) -> dict[str, Any]:
    return endpoint_slice(
        "web",
        name=name,
        addresses=["127.0.0.1"],
        ports=[("http", backends[0].port)],
        node_name=node,
    )


async def answers(rig: Rig, expected: str, timeout: float = 1.0) -> None:
    """The service port is served and reaches the backend named `expected`, within `timeout`."""

    async def reached() -> bool:
        try:
            return await tcp_name(rig.proxy.proxy_port(WEB)) == expected
        except (KeyError, OSError, TimeoutError):
            return False

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await reached():
        assert loop.time() < deadline, f"{WEB} did not reach {expected} within {timeout}s"
        await asyncio.sleep(0.02)


async def test_create_change_delete_follow_the_api_within_a_second(
    rig: Rig, backends: list[TcpBackend]
) -> None:
    rig.fake.apply(web())
    rig.fake.apply(web_slice(backends[0]))
    await answers(rig, "pod1")
    rig.fake.apply(web_slice(backends[1]))  # the slice now points elsewhere
    await answers(rig, "pod2")
    rig.fake.apply(web(labels={"team": "a"}))  # a change that keeps the listener
    rig.fake.delete("Service", "web")
    await wait_for(lambda: not rig.served(), 1.0, "the deleted service to go")


async def test_nothing_is_served_before_the_first_full_list(
    fake: FakeKube, tmp_path: Path, backends: list[TcpBackend]
) -> None:
    fake.apply(web())
    fake.apply(web_slice(backends[0]))
    fake.fail_next("list", "endpointslices", 503, times=3)
    rig = await start_rig(fake, tmp_path)  # initial_list retries until both lists succeed
    try:
        assert fake.count("list", "endpointslices") == 4
        assert rig.proxy.runner.sync_count == 1
        await answers(rig, "pod1")  # with its endpoints from the very first sync
    finally:
        await stop_rig(rig)


async def test_a_410_in_an_open_watch_relists_and_sees_deletions(
    rig: Rig, backends: list[TcpBackend]
) -> None:
    rig.fake.apply(web())
    rig.fake.apply(web_slice(backends[0]))
    rig.fake.apply(service("old", cluster_ip="10.96.0.20", ports=[("http", 80)]))
    await answers(rig, "pod1")
    await wait_for(lambda: rig.served("default/old:http"), 1.0)
    relists = [r.relists for r in rig.source.reflectors]
    # Compaction: history is gone, changes happen, and the open watches get ERROR 410.
    blind = set(rig.fake.watchers)
    rig.fake.watchers.clear()  # the changes below are not streamed to the open watches
    rig.fake.delete("Service", "old")
    rig.fake.apply(web_slice(backends[2]))
    rig.fake.compact()
    rig.fake.watchers = blind
    rig.fake.expire_watches()
    await answers(rig, "pod3")
    await wait_for(lambda: not rig.served("default/old:http"), 1.0, "the missed deletion")
    assert [r.relists for r in rig.source.reflectors] == [n + 1 for n in relists]


async def test_a_dropped_watch_resumes_from_its_version_without_a_relist(
    rig: Rig, backends: list[TcpBackend]
) -> None:
    rig.fake.apply(web())
    rig.fake.apply(web_slice(backends[0]))
    await answers(rig, "pod1")
    lists = rig.fake.count("list", "services")
    rig.fake.drop_watches()
    rig.fake.apply(web_slice(backends[1]))  # happens while nobody watches
    await answers(rig, "pod2")
    assert rig.fake.count("list", "services") == lists  # replayed from history, no relist
    watches = [path for verb, path in rig.fake.requests if verb == "watch"]
    assert "resourceVersion=" in watches[-1] and "allowwatchbookmarks=true" in watches[-1].lower()


async def test_an_expired_version_on_rewatch_relists(rig: Rig, backends: list[TcpBackend]) -> None:
    rig.fake.apply(web())
    rig.fake.apply(web_slice(backends[0]))
    await answers(rig, "pod1")
    blind = list(rig.fake.watchers)
    rig.fake.watchers.clear()  # the open watches miss the change, then drop after compaction
    rig.fake.apply(web_slice(backends[1]))
    rig.fake.compact()
    for w in blind:
        w.transport.abort()
    await answers(rig, "pod2", timeout=3)
    assert sum(r.relists for r in rig.source.reflectors) >= 1


async def test_bookmarks_move_the_version_forward(rig: Rig) -> None:
    rig.fake.apply(service("other", cluster_ip="10.96.0.30", ports=[("http", 80)]))
    await wait_for(lambda: rig.served("default/other:http"), 3.0)
    rig.fake.rv += 100  # changes elsewhere in the cluster move the version
    rig.fake.bookmark()
    await wait_for(
        lambda: all(r.resource_version == str(rig.fake.rv) for r in rig.source.reflectors),
        1.0,
        "bookmarks",
    )


async def test_api_down_keeps_serving_and_converges_when_back(
    rig: Rig, backends: list[TcpBackend]
) -> None:
    rig.fake.apply(web())
    rig.fake.apply(web_slice(backends[0]))
    await answers(rig, "pod1")
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.proxy_port(WEB))
    assert await reader.readline() == b"pod1\n"
    port = rig.fake.port
    await rig.fake.stop()
    rig.fake.apply(web_slice(backends[1]))  # changed while the server is away
    await asyncio.sleep(1.0)
    assert await tcp_name(rig.proxy.proxy_port(WEB)) == "pod1"  # last known state
    writer.write(b"still here\n")
    assert await reader.readline() == b"still here\n"  # the open connection survives
    await rig.fake.start(port=port)
    await answers(rig, "pod2", timeout=3)
    writer.close()


async def test_service_proxy_name_selects_by_label(
    fake: FakeKube, tmp_path: Path, backends: list[TcpBackend]
) -> None:
    ours = {"service.kubernetes.io/service-proxy-name": "userproxy"}
    theirs = {"service.kubernetes.io/service-proxy-name": "kube-proxy"}
    fake.apply(service("mine", cluster_ip="10.96.0.41", ports=[("http", 80)], labels=ours))
    fake.apply(service("other", cluster_ip="10.96.0.42", ports=[("http", 80)], labels=theirs))
    fake.apply(service("plain", cluster_ip="10.96.0.43", ports=[("http", 80)]))
    rig = await start_rig(fake, tmp_path, proxy_name="userproxy")
    try:
        assert {str(p.port.name) for p in rig.proxy.service_ports()} == {"default/mine:http"}
        # The label moving away is a DELETED for our selector.
        fake.apply(service("mine", cluster_ip="10.96.0.41", ports=[("http", 80)], labels=theirs))
        await wait_for(lambda: not rig.proxy.service_ports(), 1.0, "the relabelled service")
        selectors = {path for verb, path in fake.requests if "/services" in path}
        assert any("service-proxy-name%3Duserproxy" in s for s in selectors)
    finally:
        await stop_rig(rig)


async def test_internal_traffic_policy_local_uses_this_nodes_endpoints(
    fake: FakeKube, tmp_path: Path, backends: list[TcpBackend]
) -> None:
    svc = web()
    svc["spec"]["internalTrafficPolicy"] = "Local"
    fake.apply(svc)
    fake.apply(web_slice(backends[0], name="web-a", node="node-a"))
    fake.apply(web_slice(backends[1], name="web-b", node="node-b"))
    rig = await start_rig(fake, tmp_path, node="node-a")
    try:
        assert {await tcp_name(rig.proxy.proxy_port(WEB)) for _ in range(6)} == {"pod1"}
    finally:
        await stop_rig(rig)


def test_rbac_calls_are_list_and_watch_and_the_nodes_own_zone() -> None:
    assert kube.api_calls() == [
        ("", "services", "list"),
        ("", "services", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("", "nodes", "get"),
    ]
    assert ("", "endpoints", "watch") in kube.api_calls(use_endpoints=True)


async def test_core_v1_endpoints_for_old_clusters(
    fake: FakeKube, tmp_path: Path, backends: list[TcpBackend]
) -> None:
    fake.apply(web())
    fake.apply(
        {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": "web", "namespace": "default"},
            "subsets": [
                {
                    "addresses": [{"ip": "127.0.0.1"}],
                    "ports": [{"name": "http", "port": backends[1].port}],
                }
            ],
        }
    )
    proxy = UserProxy(loopback_settings())
    api = await kube.api_client(str(fake.kubeconfig(tmp_path / "kubeconfig")), None)
    source = kube.KubeSource(
        api, proxy.router, on_change=proxy.runner.request, use_endpoints=True, timeouts=FAST
    )
    await source.initial_list()
    await proxy.start()
    try:
        assert await tcp_name(proxy.proxy_port(WEB)) == "pod2"
        assert fake.count("list", "endpoints") == 1 and fake.count("list", "endpointslices") == 0
    finally:
        await proxy.stop()
        await source.close()


async def test_the_nodes_zone_comes_from_its_node_object(fake: FakeKube, tmp_path: Path) -> None:
    labels = {kube.ZONE_LABEL: "zone-a"}
    fake.apply({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "node-a1", "labels": labels}})  # fmt: skip
    api = await kube.api_client(str(fake.kubeconfig(tmp_path / "kubeconfig")), None)
    try:
        assert await kube.node_zone(api, "node-a1") == "zone-a"
        assert await kube.node_zone(api, "no-such-node") == ""  # logged; hints not used
    finally:
        await api.close()
