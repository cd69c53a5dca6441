"""Embedding userproxy in a test suite: start it on the test's event loop, declare a Service
and its endpoints in code, talk through it, change it, read its counters, stop it.

Run with `python -m pytest examples/embedding` (CI runs it with the rest of the tests).
"""

import asyncio

from userproxy import ProxySettings, UserProxy
from userproxy.objects import endpoint_slice, service


async def start_backend(name: str) -> asyncio.Server:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{name}: {(await reader.readline()).decode()}".encode())
        await writer.drain()
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0)


async def ask(port: int, line: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(line.encode() + b"\n")
    reply = (await reader.readline()).decode().strip()
    writer.close()
    return reply


async def test_service_through_an_embedded_proxy() -> None:
    blue, green = await start_backend("blue"), await start_backend("green")
    blue_port = blue.sockets[0].getsockname()[1]
    green_port = green.sockets[0].getsockname()[1]

    # No portals in-process, so listening on loopback is allowed here.
    settings = ProxySettings(bind_address="127.0.0.1", allow_loopback_bind=True)
    async with UserProxy(settings) as proxy:
        await proxy.apply(
            service("shop", cluster_ip="10.96.0.50", ports=[("http", 80)]),
            endpoint_slice("shop", addresses=["127.0.0.1"], ports=[("http", blue_port)]),
        )
        port = proxy.proxy_port("default/shop:http")
        assert await ask(port, "hi") == "blue: hi"

        # Blue/green switch: replace the slice, the next connection goes to green.
        await proxy.apply(
            endpoint_slice("shop", addresses=["127.0.0.1"], ports=[("http", green_port)])
        )
        assert await ask(port, "hi again") == "green: hi again"
        assert proxy.counters("default/shop:http").total == 2

    for server in (blue, green):
        server.close()
        await server.wait_closed()
