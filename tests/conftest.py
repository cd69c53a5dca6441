"""Every async test and fixture runs on uvloop, as the CLI does (USERPROXY_LOOP=asyncio to compare)."""

from __future__ import annotations

import asyncio
import os
from typing import Any


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Any]:
    if os.environ.get("USERPROXY_LOOP", "uvloop") == "uvloop":
        import uvloop

        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


def pytest_configure(config: Any) -> None:
    from tests.helpers import raise_fd_limit

    raise_fd_limit()
