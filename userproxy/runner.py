"""A bounded-frequency runner: runs a sync when asked, but not more often than `min_interval`
and at least every `max_interval` (kube-proxy's BoundedFrequencyRunner, on asyncio).

It also keeps the timestamps the health and metrics endpoints report: when an update was first
queued and not yet applied, and when the last sync succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("userproxy.runner")


class SyncRunner:
    def __init__(
        self,
        sync: Callable[[], Awaitable[None]],
        *,
        min_interval: float,
        max_interval: float,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._sync = sync
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._wall = wall_clock
        self._wanted = asyncio.Event()
        self._last_start = float("-inf")
        #: Wall time of the oldest request not yet covered by a completed sync.
        self.queued_at: float | None = None
        #: Wall time the last sync completed successfully.
        self.synced_at: float | None = None
        #: Wall time of the latest request (kube-proxy's last_queued_timestamp).
        self.last_queued_at: float | None = None
        self.sync_count = 0
        #: Seconds the last successful sync took.
        self.last_duration: float | None = None
        self.failures = 0
        self._in_flight: float | None = None
        #: Wall time since which something that feeds the syncs (a source) is failing.
        self.stalled_since: float | None = None
        self.on_synced: Callable[[float], None] = lambda duration: None
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def pause(self) -> None:
        """Run no sync until `resume()`; returns once the one in flight, if any, is done."""
        self._unpaused.clear()
        await self._idle.wait()

    def resume(self) -> None:
        self._unpaused.set()

    @property
    def pending_since(self) -> float | None:
        """Wall time of the oldest update not yet applied (queued, or being synced now)."""
        times = [t for t in (self._in_flight, self.queued_at, self.stalled_since) if t is not None]
        return min(times) if times else None

    def stall(self) -> None:
        """A source is failing: updates may be missing until it recovers (health counts the
        time since then as pending)."""
        if self.stalled_since is None:
            self.stalled_since = self._wall()

    def unstall(self) -> None:
        self.stalled_since = None

    def request(self) -> None:
        now = self._wall()
        self.last_queued_at = now
        if self.queued_at is None:
            self.queued_at = now
        self._wanted.set()

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            wait = self._last_start + self.max_interval - loop.time()
            if wait > 0:
                # Not wait_for: on 3.11 it can swallow a cancellation racing with the event.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wanted.wait()
            gap = self._last_start + self.min_interval - loop.time()
            if gap > 0:
                await asyncio.sleep(gap)
            await self._unpaused.wait()
            await self.run_once()

    async def run_once(self) -> None:
        """Sync now (used for the first sync and by embedders who want changes applied)."""
        loop = asyncio.get_running_loop()
        self._last_start = loop.time()
        self._wanted.clear()
        covered = self.queued_at
        self.queued_at = None
        # While the sync runs, what it covers is still pending (for health: a hung sync).
        self._in_flight = covered if covered is not None else self._wall()
        self._idle.clear()
        try:
            await self._sync()
        except Exception:
            # Keep the request queued (health turns unhealthy if this persists) and retry.
            self.queued_at = covered if covered is not None else self._wall()
            self.failures += 1
            self._in_flight = None
            self._wanted.set()
            log.exception("Sync failed; it will be retried.")
            return
        finally:
            self._idle.set()
        self._in_flight = None
        self.synced_at = self._wall()
        self.sync_count += 1
        self.last_duration = loop.time() - self._last_start
        self.on_synced(self.last_duration)
