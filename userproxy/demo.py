"""`userproxy demo`: the quickstart. Starts three small backends on loopback, writes a manifest
directory that points a Service at them, runs the proxy from it exactly as `userproxy run
--manifests` does, and shows connections being balanced, then re-balanced after the manifest
changes. No cluster and no root needed.
"""

from __future__ import annotations

import asyncio
import collections
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

from userproxy.app import UserProxy
from userproxy.objects import endpoint_slice, service
from userproxy.settings import ProxySettings
from userproxy.sources.manifests import ManifestSource

SERVICE = "default/hello:http"


async def _backend(name: str) -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(f"hello from {name}\n".encode())
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


def _manifest(ports: list[int]) -> list[dict[str, object]]:
    return [
        service("hello", cluster_ip="10.96.0.10", ports=[("http", 80)]),
        *(
            endpoint_slice(
                "hello", name=f"hello-{i + 1}", addresses=["127.0.0.1"], ports=[("http", port)]
            )
            for i, port in enumerate(ports)
        ),
    ]


def _write(path: Path, objects: list[dict[str, object]]) -> None:
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))


async def _ask(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hi\n")
    answer = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
    writer.close()
    return answer.removeprefix("hello from ")


async def _round(proxy: UserProxy, count: int, say: Callable[[str], None]) -> None:
    port = proxy.proxy_port(SERVICE)
    seen = collections.Counter([await _ask(port) for _ in range(count)])
    spread = ", ".join(f"{name}: {n}" for name, n in sorted(seen.items()))
    say(f"  {count} connections to 127.0.0.1:{port} -> {spread}")


async def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError("the proxy did not pick up the manifest change")
        await asyncio.sleep(0.05)


async def run_demo(*, connections: int = 9, say: Callable[[str], None] = print) -> None:
    names = ["backend-1", "backend-2", "backend-3"]
    backends = [await _backend(n) for n in names]
    ports = [int(b.sockets[0].getsockname()[1]) for b in backends]
    settings = ProxySettings(
        bind_address="127.0.0.1", allow_loopback_bind=True, min_sync_period=0.1
    )
    try:
        with tempfile.TemporaryDirectory(prefix="userproxy-demo-") as tmp:
            manifest = Path(tmp) / "hello.yaml"
            _write(manifest, _manifest(ports))
            say(f"Backends {', '.join(names)} listen on 127.0.0.1:{ports}.")
            say(f"Manifest: Service {SERVICE} (ClusterIP 10.96.0.10:80) with 3 EndpointSlices.")
            async with UserProxy(settings) as proxy:
                source = ManifestSource(
                    Path(tmp), proxy.router, poll_interval=0.1, on_change=proxy.runner.request
                )
                source.load()
                await proxy.runner.run_once()
                watcher = asyncio.get_running_loop().create_task(source.watch())
                try:
                    say(f"userproxy serves {SERVICE} on proxy port {proxy.proxy_port(SERVICE)}:")
                    await _round(proxy, connections, say)
                    say("Removing backend-3 from the manifest file...")
                    loads = source.loads
                    _write(manifest, _manifest(ports[:2]))
                    await _wait_for(lambda: source.loads > loads)
                    await _round(proxy, connections - connections % 2, say)
                finally:
                    watcher.cancel()
    finally:
        for b in backends:
            b.close()
            await b.wait_closed()
