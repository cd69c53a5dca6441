"""The pytest plugin (registered as `userproxy` under `pytest11`, so installing the package is
enough): an in-process proxy on loopback for a test, with helpers to point a Service at local
backends and to read what went through it.

    def test_retries(userproxy):                       # a plain (sync) test
        port = userproxy.serve("shop", backends=[("127.0.0.1", 8081), ("127.0.0.1", 8082)])
        requests.get(f"http://127.0.0.1:{port}/")
        assert userproxy.counters("shop").total == 1

    async def test_async(userproxy_async):             # with pytest-asyncio
        port = await userproxy_async.serve("shop", backends=[("127.0.0.1", 8081)])

`userproxy` runs the proxy on its own event loop in a thread, so it works from sync and async
tests alike; `userproxy_async` runs it on the test's own loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import pytest

from userproxy.app import UserProxy
from userproxy.objects import endpoint_slice, service
from userproxy.provider import CountersSnapshot
from userproxy.settings import ProxySettings

T = TypeVar("T")
Backend = tuple[str, int]
#: ClusterIPs handed to Services the helpers declare (nothing routes them: no portals here).
_VIP_BASE = "10.96.200."


def _objects(
    name: str, backends: Sequence[Backend], port: int, protocol: str, index: int, namespace: str
) -> list[dict[str, Any]]:
    """A Service and one EndpointSlice per backend port (a slice has one port per name)."""
    svc = service(name, cluster_ip=f"{_VIP_BASE}{index % 250 + 1}", namespace=namespace,
                  ports=[("p", port, protocol)])  # fmt: skip
    by_port: dict[int, list[str]] = {}
    for host, number in backends:
        by_port.setdefault(number, []).append(host)
    slices = [
        endpoint_slice(
            name,
            addresses=hosts,
            ports=[("p", number, protocol)],
            namespace=namespace,
            name=f"{name}-{number}",
        )
        for number, hosts in sorted(by_port.items())
    ]
    return [svc, *slices]


class AsyncProxyHandle:
    """A running in-process proxy on the caller's loop, with test helpers."""

    def __init__(self, proxy: UserProxy) -> None:
        self.proxy = proxy
        #: Each Service keeps its ClusterIP (and so its proxy port) across `serve` calls.
        self._vips: dict[tuple[str, str], int] = {}
        #: The EndpointSlices each Service got, so serving it again replaces its backends.
        self._slices: dict[tuple[str, str], set[str]] = {}

    async def serve(
        self,
        name: str,
        *,
        backends: Sequence[Backend],
        port: int = 80,
        protocol: str = "TCP",
        namespace: str = "default",
    ) -> int:
        """Declare (or replace) Service `name` in front of `backends`; returns the local port
        to connect to (on 127.0.0.1)."""
        key = (namespace, name)
        index = self._vips.setdefault(key, len(self._vips) + 1)
        objects = _objects(name, backends, port, protocol, index, namespace)
        await self.proxy.apply(*objects)
        slices = {obj["metadata"]["name"] for obj in objects[1:]}
        for stale in self._slices.get(key, set()) - slices:
            await self.proxy.delete("EndpointSlice", stale, namespace=namespace)
        self._slices[key] = slices
        return self.proxy.proxy_port(f"{namespace}/{name}:p")

    async def apply(self, *objects: dict[str, Any] | str) -> None:
        await self.proxy.apply(*objects)

    async def delete(self, name: str, *, namespace: str = "default") -> None:
        await self.proxy.delete("Service", name, namespace=namespace)

    def port(self, name: str, *, namespace: str = "default") -> int:
        return self.proxy.proxy_port(f"{namespace}/{name}:p")

    def counters(self, name: str, *, namespace: str = "default") -> CountersSnapshot:
        """Totals over the Service's endpoints: connections (or UDP flows), bytes, failures."""
        return self.proxy.counters(f"{namespace}/{name}:p")


class ProxyHandle:
    """The same helpers, for sync tests: the proxy runs on its own loop in a thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="userproxy", daemon=True
        )
        self._thread.start()
        settings = ProxySettings(bind_address="127.0.0.1", allow_loopback_bind=True,
                                 min_sync_period=0.0)  # fmt: skip
        self._async = self._call(self._start(settings))

    async def _start(self, settings: Any) -> AsyncProxyHandle:
        proxy = UserProxy(settings)
        await proxy.start()
        return AsyncProxyHandle(proxy)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    @property
    def proxy(self) -> UserProxy:
        return self._async.proxy

    def serve(self, name: str, *, backends: Sequence[Backend], port: int = 80,
              protocol: str = "TCP", namespace: str = "default") -> int:  # fmt: skip
        return self._call(self._async.serve(name, backends=backends, port=port,
                                            protocol=protocol, namespace=namespace))  # fmt: skip

    def apply(self, *objects: dict[str, Any] | str) -> None:
        self._call(self._async.apply(*objects))

    def delete(self, name: str, *, namespace: str = "default") -> None:
        self._call(self._async.delete(name, namespace=namespace))

    def port(self, name: str, *, namespace: str = "default") -> int:
        return self._call(_now(self._async.port, name, namespace))

    def counters(self, name: str, *, namespace: str = "default") -> CountersSnapshot:
        return self._call(_now(self._async.counters, name, namespace))

    def close(self) -> None:
        try:
            self._call(self.proxy.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


async def _now(read: Callable[..., T], name: str, namespace: str) -> T:
    """Read on the proxy's own loop (its state belongs to that thread)."""
    return read(name, namespace=namespace)


@pytest.fixture
def userproxy() -> Iterator[ProxyHandle]:
    """A running userproxy on 127.0.0.1 (no portals, no root), for sync or async tests."""
    handle = ProxyHandle()
    try:
        yield handle
    finally:
        handle.close()


try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the sync fixture still works
    pass
else:

    @pytest_asyncio.fixture
    async def userproxy_async() -> AsyncIterator[AsyncProxyHandle]:
        """A running userproxy on the test's own event loop (needs pytest-asyncio)."""
        settings = ProxySettings(bind_address="127.0.0.1", allow_loopback_bind=True,
                                 min_sync_period=0.0)  # fmt: skip
        proxy = UserProxy(settings)
        await proxy.start()
        try:
            yield AsyncProxyHandle(proxy)
        finally:
            await proxy.stop()
