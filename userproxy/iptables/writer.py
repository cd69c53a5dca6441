"""`RuleWriter`: the one thread every kernel write of a proxy runs on, and the rhythm of full
and partial syncs.

libiptc and libxtables keep process-global state that is not safe to use from whichever pool
thread happens to run a call (seen: rules silently missing after a re-sync from a different
thread), so every write, read and cleanup goes through one thread. A sync writes only what
changed, except once per `full_sync_period` (and the first, and any after a failure), when
it rewrites what it owns whole: the heal for rules someone else deleted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import math
import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")

#: The periodic sync arrives a hair under one period after the last full one.
FULL_SYNC_SLACK = 0.9


class RuleWriter:
    def __init__(
        self, *, full_sync_period: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.full_sync_period = full_sync_period
        self.clock = clock
        self._last_full = -math.inf
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="iptables")
        #: Writes done, and how many of them were full.
        self.writes = 0
        self.full_writes = 0

    def full_due(self) -> bool:
        return self.clock() - self._last_full >= FULL_SYNC_SLACK * self.full_sync_period

    async def write(self, apply: Callable[[bool], None]) -> None:
        """Run `apply(full)` on the iptables thread. A failure leaves the kernel state unknown,
        so the next write is full."""
        now = self.clock()
        full = self.full_due()
        try:
            await self.run(apply, full)
        except BaseException:
            self._last_full = -math.inf
            raise
        if full:
            self._last_full = now
            self.full_writes += 1
        self.writes += 1

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run anything else that touches iptables (reads, cleanup) on the same thread."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
