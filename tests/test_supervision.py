"""Long-lived tasks are guarded: a failure or an unexpected end is logged with the task's name,
`userproxy run` stops with a non-zero exit instead of running half-alive, and a worker
process that dies is replaced and given the current data plane."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import structlog

from tests.conftest import loopback_settings
from tests.helpers import TcpBackend, tcp_name, wait_for
from userproxy import UserProxy, main, tasks
from userproxy.objects import endpoint_slice, service
from userproxy.userspace.proxier import Proxier
from userproxy.userspace.workers import WorkerPool


async def test_a_failing_task_is_logged_with_its_name_and_ends_the_group() -> None:
    async def broken() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    forever = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        ended = await tasks.first_exit({"watch": broken(), "sync": forever.wait()})
    assert ended.task == "watch" and ended.failed
    failures = [e for e in logs if e["event"] == "A long-lived task failed."]
    assert [e["task"] for e in failures] == ["watch"]


async def test_a_task_that_returns_is_an_unexpected_end() -> None:
    async def done() -> int:
        return 7

    with structlog.testing.capture_logs() as logs:
        ended = await tasks.first_exit({"source": done(), "other": asyncio.sleep(30)})
    assert ended == tasks.Exit("source", failed=False, result=7)
    assert any(e["event"] == "A long-lived task ended unexpectedly." for e in logs)


async def test_a_failing_source_is_restarted_and_health_says_so_meanwhile(
    backends: list[TcpBackend],
) -> None:
    proxy = UserProxy(loopback_settings())
    await proxy.apply(
        service("web", cluster_ip="10.96.0.10", ports=[("http", 80)]),
        endpoint_slice("web", addresses=["127.0.0.1"], ports=[("http", backends[0].port)]),
    )
    attempts = 0
    recovered = asyncio.Event()

    async def flaky_watch() -> None:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            raise ConnectionResetError("the watch broke in a way nobody handled")
        recovered.set()
        await asyncio.Event().wait()

    async def run() -> int:
        return await main._run(main.Node.bare(proxy), flaky_watch, manifests="test")

    with structlog.testing.capture_logs() as logs:
        running = asyncio.ensure_future(run())
        await wait_for(lambda: attempts == 2, 5, "the second attempt")
        assert proxy.runner.pending_since is not None  # health counts the outage
        assert await tcp_name(proxy.proxy_port("default/web:http")) == "pod1"  # still serving
        await asyncio.wait_for(recovered.wait(), 5)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    restarts = [e for e in logs if e["event"] == "A long-lived task ended; restarting it."]
    assert len(restarts) == 1  # the same cause twice is said once
    assert proxy.sync_task is None  # stopped cleanly on cancellation


async def test_run_stops_with_a_non_zero_exit_when_the_sync_loop_ends() -> None:
    proxy = UserProxy(loopback_settings())

    async def no_sync() -> None:  # the loop that must never end, ending
        return None

    proxy.runner.run_forever = no_sync  # type: ignore[method-assign]
    forever = asyncio.Event()
    assert (
        await main._run(main.Node.bare(proxy), forever.wait, manifests="test") == main.EXIT_FAILED
    )
    assert proxy.sync_task is None


async def test_a_dead_worker_is_replaced_and_serves_again(backends: list[TcpBackend]) -> None:
    settings = loopback_settings(workers=2)
    pool = WorkerPool(2, settings)
    proxier = Proxier(settings=settings, followers=pool)
    proxy = UserProxy(settings, provider=proxier)
    async with proxy:
        await proxy.apply(
            service("web", cluster_ip="10.96.0.10", ports=[("http", 80)]),
            endpoint_slice("web", addresses=["127.0.0.1"], ports=[("http", backends[0].port)]),
        )
        port = proxy.proxy_port("default/web:http")
        [first] = pool.pids
        await wait_for(lambda: _listens(first, port), 5, "the worker to open the proxy port")
        os.kill(first, signal.SIGKILL)  # a worker we started
        await wait_for(lambda: pool.spawned == 2 and pool.pids != [first], 5, "a replacement")
        [second] = pool.pids
        await wait_for(lambda: _listens(second, port), 5, "the replacement to open the port")
    assert pool.pids == [second]
    with pytest.raises(ProcessLookupError):
        os.kill(second, 0)  # stopped with the proxy


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a listening socket on `port` (from /proc)."""
    try:
        inodes = {
            os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1]
            for fd in os.listdir(f"/proc/{pid}/fd")
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")
        }
        with open(f"/proc/{pid}/net/tcp") as table:
            rows = [line.split() for line in table.readlines()[1:]]
    except OSError:
        return False
    return any(
        int(row[1].split(":")[1], 16) == port and row[3] == "0A" and row[9] in inodes
        for row in rows
    )
