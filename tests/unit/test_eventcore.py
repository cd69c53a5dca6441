"""The relays' event core on real sockets: edge-triggered delivery, deferred closes, the
deadline heap, and a handler's fault confined to that handler."""

from __future__ import annotations

import asyncio
import socket

from tests.helpers import wait_for
from userproxy.userspace import eventcore
from userproxy.userspace.eventcore import CONNECTION_EVENTS, EPOLLIN


class Recorder:
    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.events: list[int] = []

    def on_events(self, fd: int, events: int) -> None:
        self.events.append(events)
        if self.fail:
            raise RuntimeError("a bug in one relay")


async def test_a_failing_handler_does_not_cost_the_others_their_events() -> None:
    core = eventcore.for_loop(asyncio.get_running_loop())
    pairs = [socket.socketpair() for _ in range(3)]
    recorders = [Recorder(fail=i == 0) for i in range(3)]
    core.acquire()
    try:
        for (ours, _), recorder in zip(pairs, recorders, strict=True):
            ours.setblocking(False)
            core.register(ours, recorder, CONNECTION_EVENTS)
        for _, theirs in pairs:
            theirs.send(b"x")
        await wait_for(lambda: all(any(e & EPOLLIN for e in r.events) for r in recorders), 2)
    finally:
        for ours, theirs in pairs:
            core.close_later(ours)
            theirs.close()
        core.release()
    assert core.closed  # no listener, no socket: the core let its epoll go


async def test_deadlines_run_in_order_and_closes_wait_for_the_batch_end() -> None:
    core = eventcore.for_loop(asyncio.get_running_loop())
    core.acquire()
    ran: list[str] = []
    now = core.loop.time()
    core.call_at(now + 0.05, lambda: ran.append("second"))
    core.call_at(now + 0.01, lambda: ran.append("first"))
    core.call_at(now + 0.02, lambda: 1 / 0)  # a fault in one deadline spares the others
    await wait_for(lambda: len(ran) == 2, 2)
    assert ran == ["first", "second"]
    ours, theirs = socket.socketpair()
    closed_in_batch: list[int] = []

    def close_then_look() -> None:
        core.close_later(ours)
        closed_in_batch.append(ours.fileno())  # still open until the batch ends

    core.again(close_then_look)
    await wait_for(lambda: ours.fileno() == -1, 2)
    assert closed_in_batch and closed_in_batch[0] >= 0
    theirs.close()
    core.release()
