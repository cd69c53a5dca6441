"""The TCP relay's network behaviour: half-close, resets, backpressure, failover, scale."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import loopback_settings
from tests.helpers import LOCAL, TcpBackend, send_reset, wait_for
from userproxy import UserProxy
from userproxy.objects import endpoint_slice, service

NAME = "default/web:p"
MIB = 1024 * 1024


async def serve(proxy: UserProxy, *ports: int) -> int:
    await proxy.apply(
        service("web", cluster_ip="10.96.0.10", ports=[("p", 80)]),
        *(
            endpoint_slice("web", name=f"web-{p}", addresses=[LOCAL], ports=[("p", p)])
            for p in ports
        ),
    )
    return proxy.proxy_port(NAME)


async def test_half_close_client_still_receives_the_full_response(proxy: UserProxy) -> None:
    response = os.urandom(3 * 1024 * 1024)

    async def read_all_then_answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        request = await reader.read()  # until the client's FIN arrives
        writer.write(len(request).to_bytes(8, "big") + response)
        await writer.drain()
        writer.close()

    backend = await TcpBackend("b").start(read_all_then_answer)
    port = await serve(proxy, backend.port)
    reader, writer = await asyncio.open_connection(LOCAL, port)
    writer.write(b"q" * 100_000)
    writer.write_eof()  # FIN: the backend sees end of request while its answer still flows
    got = await asyncio.wait_for(reader.read(), 10)
    assert int.from_bytes(got[:8], "big") == 100_000 and got[8:] == response
    writer.close()
    await backend.stop()


async def test_backend_half_close_keeps_client_to_backend_flowing(proxy: UserProxy) -> None:
    received = asyncio.get_running_loop().create_future()

    async def hello_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"greeting")
        writer.write_eof()  # the backend is done talking but keeps listening
        received.set_result(await reader.read())
        writer.close()

    backend = await TcpBackend("b").start(hello_then_listen)
    port = await serve(proxy, backend.port)
    reader, writer = await asyncio.open_connection(LOCAL, port)
    assert await asyncio.wait_for(reader.read(), 5) == b"greeting"  # EOF seen by the client
    writer.write(b"late data after the backend's FIN")
    writer.write_eof()
    assert await asyncio.wait_for(received, 5) == b"late data after the backend's FIN"
    writer.close()
    await backend.stop()
    await wait_for(lambda: proxy.counters(NAME).active == 0, what="relay closed")


async def test_backend_reset_reaches_the_client_as_a_reset(proxy: UserProxy) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        send_reset(writer)

    backend = await TcpBackend("b").start(reset)
    port = await serve(proxy, backend.port)
    reader, writer = await asyncio.open_connection(LOCAL, port)
    writer.write(b"x")
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await backend.stop()


async def test_client_reset_reaches_the_backend_as_a_reset(proxy: UserProxy) -> None:
    outcome = asyncio.get_running_loop().create_future()

    async def wait_for_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
            outcome.set_result("eof")
        except ConnectionResetError:
            outcome.set_result("reset")
        writer.close()

    backend = await TcpBackend("b").start(wait_for_client)
    port = await serve(proxy, backend.port)
    _reader, writer = await asyncio.open_connection(LOCAL, port)
    writer.write(b"x")
    await wait_for(lambda: proxy.counters(NAME).active == 1, what="relay up")
    send_reset(writer)
    assert await asyncio.wait_for(outcome, 5) == "reset"
    await backend.stop()


async def test_no_endpoints_closes_the_connection_at_once(proxy: UserProxy) -> None:
    await proxy.apply(service("web", cluster_ip="10.96.0.10", ports=[("p", 80)]))
    reader, writer = await asyncio.open_connection(LOCAL, proxy.proxy_port(NAME))
    started = time.monotonic()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 2)
    assert time.monotonic() - started < 0.5
    writer.close()
    await wait_for(lambda: proxy.service_ports()[0].has_endpoints is False)


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full, so further SYNs are dropped and dials time out."""
    hole = socket.socket()
    hole.bind((LOCAL, 0))
    hole.listen(0)
    fillers = [socket.socket() for _ in range(4)]
    for s in fillers:
        s.setblocking(False)
        s.connect_ex(hole.getsockname())
    yield hole.getsockname()[1]
    for s in [*fillers, hole]:
        s.close()


async def test_dial_failover_costs_at_most_one_failed_attempt(
    proxy: UserProxy, backends: list[TcpBackend], blackhole: int
) -> None:
    dead = blackhole
    port = await serve(proxy, dead, backends[0].port, backends[1].port)
    timings = []
    for _ in range(9):
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(LOCAL, port)
        assert (await asyncio.wait_for(reader.readline(), 5)).strip() in (b"pod1", b"pod2")
        timings.append(time.monotonic() - started)
        writer.close()
    failures = proxy.endpoint_counters(NAME)[f"{LOCAL}:{dead}"].dial_failures
    # A failed pick uses up a round-robin turn too: 9 good picks plus one dead pick per
    # three picks in all.
    assert 4 <= failures <= 5
    # No connection lost more than the first 0.25 s attempt (a second would add 0.5 s).
    assert max(timings) < 0.25 + 0.2
    assert sorted(timings)[3] < 0.1  # the others were not delayed at all


async def test_accepting_never_waits_for_a_slow_dial(
    proxy: UserProxy, backends: list[TcpBackend], blackhole: int
) -> None:
    port = await serve(proxy, blackhole)
    stuck = [await asyncio.open_connection(LOCAL, port) for _ in range(5)]  # all dialling
    # The endpoint set changes while they dial.
    await proxy.delete("EndpointSlice", f"web-{blackhole}")
    await serve(proxy, backends[0].port)
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(LOCAL, port)
    assert await asyncio.wait_for(reader.readline(), 1) == b"pod1\n"
    assert time.monotonic() - started < 0.2
    writer.close()
    for _, w in stuck:
        w.close()
        with contextlib.suppress(OSError):
            await w.wait_closed()


async def test_a_thousand_concurrent_connections_with_every_byte_checked(
    proxy: UserProxy, backends: list[TcpBackend]
) -> None:
    port = await serve(proxy, *(b.port for b in backends))

    async def one(i: int) -> None:
        payload = os.urandom(8192 + i)
        reader, writer = await asyncio.open_connection(LOCAL, port)
        name = await reader.readline()
        writer.write(payload)
        writer.write_eof()
        echoed = await reader.read()
        writer.close()
        assert name.startswith(b"pod") and echoed == payload

    opened = [one(i) for i in range(1000)]
    await asyncio.wait_for(asyncio.gather(*opened), 60)
    totals = proxy.counters(NAME)
    assert totals.total == 1000
    expected = sum(8192 + i for i in range(1000))
    assert totals.bytes_from_clients == expected
    assert totals.bytes_to_clients == expected + 5 * 1000
    await wait_for(lambda: proxy.counters(NAME).active == 0, what="all relays closed")


async def test_bulk_both_ways_with_a_slow_reader_keeps_every_byte_in_order(
    proxy: UserProxy,
) -> None:
    """Megabytes both ways on four connections at once while the client reads slowly, so the
    proxy's writes to it are partial and queue: every byte arrives, in order, and counted."""
    size = 4 * MIB + 12345
    backend = await TcpBackend("b").start(_echo)
    port = await serve(proxy, backend.port)

    async def one() -> None:
        payload = os.urandom(size)
        reader, writer = await asyncio.open_connection(LOCAL, port)

        async def send() -> None:
            for i in range(0, size, 100_000):
                writer.write(payload[i : i + 100_000])
                await writer.drain()
            writer.write_eof()

        async def receive_slowly() -> bytes:
            got = bytearray()
            while chunk := await reader.read(65536):
                got += chunk
                if len(got) % 7 == 0:
                    await asyncio.sleep(0.001)
            return bytes(got)

        _, echoed = await asyncio.wait_for(asyncio.gather(send(), receive_slowly()), 30)
        writer.close()
        assert echoed == payload

    await asyncio.gather(*(one() for _ in range(4)))
    totals = proxy.counters(NAME)
    assert totals.bytes_from_clients == totals.bytes_to_clients == 4 * size
    await wait_for(lambda: proxy.counters(NAME).active == 0, what="relays closed")
    await backend.stop()


async def test_a_reset_after_bulk_still_reaches_the_client_as_a_reset(proxy: UserProxy) -> None:
    async def stream_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        writer.write(b"z" * (2 * MIB))
        await writer.drain()
        await reader.readexactly(1)  # the client has read everything
        send_reset(writer)

    backend = await TcpBackend("b").start(stream_then_reset)
    port = await serve(proxy, backend.port)
    reader, writer = await asyncio.open_connection(LOCAL, port)
    writer.write(b"x")
    assert await asyncio.wait_for(reader.readexactly(2 * MIB), 10) == b"z" * (2 * MIB)
    writer.write(b"y")
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await backend.stop()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


async def test_finished_relays_are_freed_without_the_cycle_collector(proxy: UserProxy) -> None:
    """Per-connection objects must die by reference counting: objects left in reference cycles
    make the cycle collector run every few dozen connections, which cost a third of the CPU
    at high connection rates."""
    import gc

    from userproxy.userspace import tcp

    backend = await TcpBackend("b").start()
    port = await serve(proxy, backend.port)
    gc.collect()
    gc.garbage.clear()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            reader, writer = await asyncio.open_connection(LOCAL, port)
            assert await reader.readexactly(2) == b"b\n"
            writer.close()
            await writer.wait_closed()
        await wait_for(lambda: proxy.counters(NAME).active == 0, what="relays closed")
        await wait_for(lambda: not backend.handlers, what="backend handlers done")
        gc.collect()
        relay_types = (tcp.Relay, asyncio.Task)
        leaked = [o for o in gc.garbage if isinstance(o, relay_types)]
        kinds = sorted({type(o).__name__ for o in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        await backend.stop()
    assert not leaked, f"relay objects freed only by the cycle collector: {kinds}"


def test_the_relay_core_runs_on_the_standard_asyncio_loop() -> None:
    """Embedders may run any asyncio loop: the event core needs only `add_reader`. A hundred
    echoed connections, each half-closed by its client, on the standard selector loop."""

    async def echo_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _echo(reader, writer)
        writer.close()
        await writer.wait_closed()

    async def scenario() -> None:
        echo = await asyncio.start_server(echo_and_close, LOCAL, 0)
        async with UserProxy(loopback_settings()) as proxy:
            port = await serve(proxy, echo.sockets[0].getsockname()[1])

            async def one(i: int) -> bytes:
                reader, writer = await asyncio.open_connection(LOCAL, port)
                writer.write(b"%d " % i * 1000)
                writer.write_eof()
                data = await reader.read()
                writer.close()
                await writer.wait_closed()
                return data

            got = await asyncio.gather(*(one(i) for i in range(100)))
            assert got == [b"%d " % i * 1000 for i in range(100)]
            await wait_for(lambda: proxy.counters(NAME).active == 0, what="relays closed")
        echo.close()
        await echo.wait_closed()

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(scenario())
