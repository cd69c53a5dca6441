"""`--workers N`: the data plane in N processes on the same proxy ports (SO_REUSEPORT).

The leader (the `userproxy run` process) keeps everything else: the source, the sync runner,
the portals, the health and metrics servers. After every change it sends the workers a
snapshot of the data plane (`wire.py`) over a socketpair; each worker opens the same
listeners with SO_REUSEPORT and balances on its own, steered by client IP (`steering.py`).
Workers send their traffic counters back every second, and the leader's `status()` adds
them up.

Each worker has a supervisor task in the leader: a worker that dies is logged and replaced
(after a pause that grows while it keeps dying), and the new one is sent the current data
plane at once. Its connections are gone; new ones go to the replacement.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Callable

import structlog

from userproxy import logs, tasks
from userproxy.provider import Counters
from userproxy.settings import Settings, from_data, to_data
from userproxy.userspace import wire
from userproxy.userspace.proxier import Proxier

log = structlog.get_logger("userproxy.workers")

#: Seconds between a worker's death and its replacement: doubles while it keeps dying.
RESPAWN_DELAYS = (0.1, 0.5, 2.0, 5.0)
#: A worker that lived this long resets the delay.
HEALTHY_AFTER = 30.0


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.counters: Counters = {}


class WorkerPool:
    """The leader's side: the userspace proxier's `Followers`."""

    def __init__(self, count: int, settings: Settings) -> None:
        self.count = count
        self.settings = settings
        self._workers = [_Worker(i) for i in range(1, count)]
        self._supervisors: list[asyncio.Task[None]] = []
        self._pending: asyncio.Handle | None = None
        self._state: Callable[[], wire.DataPlane] = list
        self._stopping = False
        #: A successor serves the ports: no data plane is sent any more.
        self._draining = False
        #: Workers started, replacements included.
        self.spawned = 0

    async def start(self) -> None:
        for worker in self._workers:
            await self._spawn(worker)
            self._supervisors.append(
                tasks.guarded(self._supervise(worker), name=f"worker-{worker.index}")
            )
        log.info("Started the worker processes.", workers=self.count)

    async def _spawn(self, worker: _Worker) -> None:
        ours, theirs = socket.socketpair()
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "userproxy", "_worker", "--channel-fd",
                str(theirs.fileno()), pass_fds=(theirs.fileno(),),
            )  # fmt: skip
        finally:
            theirs.close()
        worker.reader, worker.writer = await asyncio.open_connection(sock=ours)
        # The first line is the settings, as data; then data-plane snapshots.
        worker.writer.write(json.dumps(to_data(self.settings)).encode() + b"\n")
        worker.writer.write(wire.encode_state(self._state()))
        self.spawned += 1

    async def _supervise(self, worker: _Worker) -> None:
        """Read the worker's counters until it dies; replace it, unless the pool stops."""
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            assert worker.reader is not None and worker.proc is not None
            while line := await worker.reader.readline():
                worker.counters = wire.decode_counters(line)
            code = await worker.proc.wait()
            worker.counters = {}
            if worker.writer is not None:
                worker.writer.close()  # the dead worker's end of the channel
            if self._stopping:
                return
            failures = 0 if loop.time() - started > HEALTHY_AFTER else failures + 1
            delay = RESPAWN_DELAYS[min(failures, len(RESPAWN_DELAYS)) - 1] if failures else 0.0
            log.error(
                "A worker process ended; its connections are gone. Starting a replacement.",
                worker=worker.index,
                exit_code=code,
                delay_seconds=delay,
            )
            await asyncio.sleep(delay)
            await self._spawn(worker)

    def publish(self, state: Callable[[], wire.DataPlane]) -> None:
        """Send the data plane soon (once per loop turn, however many changes)."""
        self._state = state
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._pending = None
        if self._draining:
            return
        line = wire.encode_state(self._state())
        for worker in self._workers:
            if worker.writer is not None and not worker.writer.is_closing():
                worker.writer.write(line)

    def stop_accepting(self) -> None:
        """Tell every worker a successor serves the proxy ports (see `run_worker`)."""
        self._draining = True
        for worker in self._workers:
            if worker.writer is not None and not worker.writer.is_closing():
                worker.writer.write(wire.DRAIN)

    def relays(self) -> int:
        return sum(
            c.active for w in self._workers for eps in w.counters.values() for c in eps.values()
        )

    def counters(self) -> Counters:
        total: Counters = {}
        for worker in self._workers:
            for name, eps in worker.counters.items():
                mine = total.setdefault(name, {})
                for ep, c in eps.items():
                    mine[ep] = mine[ep] + c if ep in mine else c
        return total

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w.proc is not None]

    async def stop(self) -> None:
        self._stopping = True
        for worker in self._workers:
            if worker.writer is not None:
                worker.writer.close()
            if worker.proc is not None and worker.proc.returncode is None:
                worker.proc.terminate()
        for worker in self._workers:
            if worker.proc is not None:
                try:
                    async with asyncio.timeout(10):
                        await worker.proc.wait()
                except TimeoutError:
                    worker.proc.kill()
        await tasks.stop_all(self._supervisors)


# ----------------------------------------------------------------------------- worker side
async def run_worker(channel_fd: int) -> int:
    """A worker: read the settings, then follow the leader's snapshots with listeners and
    balancers of its own."""
    sock = socket.socket(fileno=channel_fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    first = await reader.readline()
    if not first:
        return 0  # the leader went away before saying anything
    settings = from_data(json.loads(first))
    logs.configure(verbosity=settings.logging.verbosity, fmt=settings.logging.format)
    proxier = Proxier(settings=settings)

    async def report() -> None:
        while True:
            await asyncio.sleep(1.0)
            counters = {
                str(sp.name): {e.endpoint: e.counters for e in sp.endpoints if e.counters}
                for sp in proxier.status().service_ports
            }
            writer.write(wire.encode_counters(counters))

    reporter = tasks.guarded(report(), name="worker-report")
    try:
        while line := await reader.readline():
            if line == wire.DRAIN:
                # A successor's workers serve the ports: this one's sockets leave their
                # SO_REUSEPORT groups; its relays run on until the leader ends it.
                proxier.stop_accepting(shared=False)
                continue
            await proxier.follow(wire.decode_state(line))
    finally:
        await tasks.stop_all([reporter])
        await proxier.close()
    log.info("The leader went away; worker stopping.", pid=os.getpid())
    return 0
