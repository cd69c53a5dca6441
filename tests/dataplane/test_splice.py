"""Bulk relays handed to splice(2): the relay contract (FIN as FIN, reset as reset, exact
counters, teardown) holds after the hand-over, in both directions."""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.helpers import LOCAL, TcpBackend, send_reset, wait_for
from userproxy import UserProxy
from userproxy.objects import endpoint_slice, service
from userproxy.userspace.splice import SPLICE_AFTER
from userproxy.userspace.tcp import Relay

NAME = "default/bulk:p"
BULK = 3 * SPLICE_AFTER + 4321


async def serve(proxy: UserProxy, port: int) -> int:
    await proxy.apply(
        service("bulk", cluster_ip="10.96.0.20", ports=[("p", 80)]),
        endpoint_slice("bulk", addresses=[LOCAL], ports=[("p", port)]),
    )
    return proxy.proxy_port(NAME)


def relays(proxy: UserProxy) -> list[Relay]:
    runtime = proxy.provider.runtimes[next(iter(proxy.provider.runtimes))]  # type: ignore[union-attr]
    return list(runtime.connections)


def spliced(proxy: UserProxy) -> bool:
    return any(r.spliced is not None for r in relays(proxy))


async def test_upload_fin_then_download_through_splice(proxy: UserProxy) -> None:
    """The client uploads, half-closes, then downloads: the FIN crosses the spliced relay after
    every byte, and the answer flows back the other way."""
    answer = os.urandom(BULK)
    seen = asyncio.get_running_loop().create_future()

    async def take_all_then_answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        request = await reader.read()  # until the FIN
        seen.set_result(request)
        writer.write(answer)
        await writer.drain()
        writer.close()

    backend = await TcpBackend("b").start(take_all_then_answer)
    port = await serve(proxy, backend.port)
    upload = os.urandom(BULK)
    reader, writer = await asyncio.open_connection(LOCAL, port)
    writer.write(upload)
    await writer.drain()
    await wait_for(lambda: spliced(proxy), what="the relay handed to splice")
    writer.write_eof()
    assert await asyncio.wait_for(seen, 10) == upload
    assert await asyncio.wait_for(reader.read(), 10) == answer
    writer.close()
    await wait_for(lambda: proxy.counters(NAME).active == 0, what="relay closed")
    totals = proxy.counters(NAME)
    assert (totals.bytes_from_clients, totals.bytes_to_clients) == (BULK, BULK)
    assert relays(proxy) == []
    await backend.stop()


async def test_backend_fin_during_splice_keeps_the_client_direction_open(
    proxy: UserProxy,
) -> None:
    received = asyncio.get_running_loop().create_future()
    greeting = os.urandom(BULK)

    async def stream_then_listen(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(greeting)
        await writer.drain()
        writer.write_eof()  # done talking, still listening
        received.set_result(await reader.read())
        writer.close()

    backend = await TcpBackend("b").start(stream_then_listen)
    port = await serve(proxy, backend.port)
    reader, writer = await asyncio.open_connection(LOCAL, port)
    assert await asyncio.wait_for(reader.read(), 10) == greeting  # ends with the FIN
    assert spliced(proxy)
    writer.write(b"after the backend's FIN")
    writer.write_eof()
    assert await asyncio.wait_for(received, 5) == b"after the backend's FIN"
    writer.close()
    await wait_for(lambda: proxy.counters(NAME).active == 0, what="relay closed")
    await backend.stop()


async def test_client_reset_during_splice_reaches_the_backend_as_a_reset(
    proxy: UserProxy,
) -> None:
    outcome = asyncio.get_running_loop().create_future()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(65536):
                pass
            outcome.set_result("eof")
        except ConnectionResetError:
            outcome.set_result("reset")
        writer.close()

    backend = await TcpBackend("b").start(sink)
    port = await serve(proxy, backend.port)
    _reader, writer = await asyncio.open_connection(LOCAL, port)
    writer.write(os.urandom(BULK))
    await writer.drain()
    await wait_for(lambda: spliced(proxy), what="the relay handed to splice")
    send_reset(writer)
    assert await asyncio.wait_for(outcome, 5) == "reset"
    await wait_for(lambda: proxy.counters(NAME).active == 0, what="relay closed")
    await backend.stop()


async def test_removing_the_service_resets_a_spliced_relay(proxy: UserProxy) -> None:
    async def stream_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = os.urandom(65536)
        for _ in range(100_000):
            writer.write(chunk)
            await writer.drain()

    backend = await TcpBackend("b").start(stream_forever)
    port = await serve(proxy, backend.port)
    reader, writer = await asyncio.open_connection(LOCAL, port)
    await asyncio.wait_for(reader.readexactly(2 * SPLICE_AFTER), 10)
    await wait_for(lambda: spliced(proxy), what="the relay handed to splice")
    await proxy.delete("Service", "bulk")
    with pytest.raises(ConnectionResetError):
        for _ in range(10_000):
            if not await asyncio.wait_for(reader.read(1 << 20), 5):
                break
    writer.close()
    await backend.stop()


async def test_without_descriptor_budget_bulk_stays_on_transports(proxy: UserProxy) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()

    backend = await TcpBackend("b").start(echo)
    port = await serve(proxy, backend.port)
    proxy.provider.runtimes[next(iter(proxy.provider.runtimes))].listener.splice_budget = 0  # type: ignore[union-attr]
    payload = os.urandom(BULK)
    reader, writer = await asyncio.open_connection(LOCAL, port)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    _, echoed = await asyncio.wait_for(asyncio.gather(send(), reader.read()), 10)
    assert echoed == payload
    assert not spliced(proxy)
    writer.close()
    await wait_for(lambda: proxy.counters(NAME).active == 0, what="relay closed")
    await backend.stop()


async def test_spliced_relays_are_counted_until_they_close(proxy: UserProxy) -> None:
    from userproxy.userspace.splice import SpliceRelay

    before = SpliceRelay.active
    answer = os.urandom(BULK)

    async def answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()
        writer.close()

    backend = await TcpBackend("b").start(answer_then_close)
    port = await serve(proxy, backend.port)
    reader, writer = await asyncio.open_connection(LOCAL, port)
    assert (
        await asyncio.wait_for(reader.readexactly(2 * SPLICE_AFTER), 10)
        == answer[: 2 * SPLICE_AFTER]
    )
    assert SpliceRelay.active == before + 1
    assert await asyncio.wait_for(reader.read(), 10) == answer[2 * SPLICE_AFTER :]
    writer.close()
    await wait_for(lambda: proxy.counters(NAME).active == 0, what="relay closed")
    assert SpliceRelay.active == before
    await backend.stop()
