"""Shared fixtures. Every async test runs on uvloop, as the CLI does (USERPROXY_LOOP=asyncio
to compare with the stock loop)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.helpers import TcpBackend, udp_echo
from userproxy import ProxySettings, UserProxy


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    if os.environ.get("USERPROXY_LOOP", "uvloop") == "uvloop":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


def pytest_configure(config: Any) -> None:
    from tests.helpers import raise_fd_limit

    raise_fd_limit()


def loopback_settings(**overrides: object) -> ProxySettings:
    values: dict[str, object] = {
        "bind_address": "127.0.0.1",
        "allow_loopback_bind": True,
        "min_sync_period": 0.0,
    }
    values.update(overrides)
    return ProxySettings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def proxy() -> AsyncIterator[UserProxy]:
    p = UserProxy(loopback_settings())
    await p.start()
    yield p
    await p.stop()


@pytest.fixture
async def backends() -> AsyncIterator[list[TcpBackend]]:
    started = [await TcpBackend(f"pod{i}").start() for i in (1, 2, 3)]
    yield started
    for b in started:
        await b.stop()


@pytest.fixture
async def udp_backend() -> AsyncIterator[int]:
    transport, port = await udp_echo()
    yield port
    transport.close()
