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


async def test_run_stops_with_a_non_zero_exit_when_the_source_ends(
    backends: list[TcpBackend],
) -> None:
    proxy = UserProxy(loopback_settings())
    await proxy.apply(
        service("web", cluster_ip="10.96.0.10", ports=[("http", 80)]),
        endpoint_slice("web", addresses=["127.0.0.1"], ports=[("http", backends[0].port)]),
    )

    async def watch_that_dies() -> None:
        assert await tcp_name(proxy.proxy_port("default/web:http")) == "pod1"
        raise ConnectionResetError("the watch broke in a way nobody handled")

    assert await main._run(proxy, watch_that_dies, manifests="test") == main.EXIT_FAILED
    assert proxy.sync_task is None  # stopped cleanly: the sync loop is gone too
    assert proxy.service_ports() == []


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
