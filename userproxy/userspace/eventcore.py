"""The data plane's own event core: one edge-triggered epoll, driven from the asyncio loop.

Relays register their raw non-blocking sockets here once, for input, output and the peer's
half-close (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET), and never touch the registration
again: with edge triggering an event says "something changed", so a handler reads or writes
until the kernel says EAGAIN (or a short read says the queue is empty) and then waits for the
next edge. The asyncio loop (uvloop or the standard one) sees a single reader, the epoll
descriptor; each time it is readable, one batch of events is handled.

Why not transports: a uvloop transport costs a Task and future per dial, getsockname and
getpeername per socket, a forced TCP_NODELAY and a connect-result getsockopt, plus the Python
objects around them; this core costs a dict lookup per event (see bench/connections.py).

Facts the handlers rely on:
- A descriptor is closed only at the end of a batch (`close_later`): the kernel reuses the
  lowest free number at once, and an event still queued in the same batch for the old socket
  must not reach the new one.
- Deadlines (dial timeouts) are one heap for the whole process, swept at the end of each batch
  and by one asyncio timer set for the earliest: no timer object per connection.
- Work a handler could not finish fairly in one go (a long burst of accepts) is queued with
  `again` and resumed at the next turn of the loop.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import select
import socket
import weakref
from collections.abc import Callable
from typing import Protocol

import structlog

log = structlog.get_logger("userproxy.eventcore")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
EPOLLRDHUP = select.EPOLLRDHUP
EPOLLET = select.EPOLLET
#: What a connected socket is registered for, once, for its whole life.
CONNECTION_EVENTS = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
#: What a listening socket is registered for.
LISTENER_EVENTS = EPOLLIN | EPOLLET
#: Events handled per batch; more stay queued in the epoll and come in the next batch.
MAX_EVENTS = 512


class Handler(Protocol):
    def on_events(self, fd: int, events: int) -> None:
        """`events` (EPOLL* bits) happened on `fd`, one of the handler's registered sockets."""
        ...


class EventCore:
    """One per event loop (`for_loop`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # A weak reference: the loop holds this core (through its reader), and a loop that
        # is gone must take the core, and its epoll descriptor, with it.
        self._loop = weakref.ref(loop)
        self._epoll = select.epoll()
        weakref.finalize(loop, self._epoll.close)
        self._handlers: dict[int, Handler] = {}
        self._closing: list[socket.socket] = []
        self._deadlines: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._again: list[Callable[[], None]] = []
        self._again_scheduled = False
        self._in_batch = False
        #: Listeners using the core; with none and no socket registered, it closes.
        self.users = 0
        self.closed = False
        loop.add_reader(self._epoll.fileno(), self._run_batch)

    # ------------------------------------------------------------------ registration
    def register(self, sock: socket.socket, handler: Handler, events: int) -> None:
        fd = sock.fileno()
        self._handlers[fd] = handler
        self._epoll.register(fd, events)

    def forget(self, sock: socket.socket) -> None:
        """Stop watching a socket that stays open (handed to another owner)."""
        fd = sock.fileno()
        if self._handlers.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def close_later(self, sock: socket.socket) -> None:
        """Stop watching the socket and close it at the end of this batch (closing removes it
        from the epoll set too); outside a batch (a control-plane call), now."""
        fd = sock.fileno()
        if fd < 0:
            return
        self._handlers.pop(fd, None)
        if self._in_batch:
            self._closing.append(sock)
        else:
            sock.close()
            self._close_if_unused()

    def acquire(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        self._close_if_unused()

    def _close_if_unused(self) -> None:
        if self.users <= 0 and not self._handlers and not self._in_batch:
            self.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        assert loop is not None, "the event loop is gone"
        return loop

    # ------------------------------------------------------------------ time
    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        """Run `callback` at loop time `when` (not cancellable: callbacks check their state)."""
        heapq.heappush(self._deadlines, (when, next(self._sequence), callback))
        if when < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = when
            self._timer = self.loop.call_at(when, self._on_timer)

    def again(self, callback: Callable[[], None]) -> None:
        """Run `callback` at the next turn of the loop (after other ready work)."""
        self._again.append(callback)
        if not self._again_scheduled:
            self._again_scheduled = True
            self.loop.call_soon(self._run_again)

    # ------------------------------------------------------------------ dispatch
    def _run_batch(self) -> None:
        if self.closed:
            return
        try:
            events = self._epoll.poll(0, MAX_EVENTS)
        except OSError:
            return
        self._in_batch = True
        try:
            handlers = self._handlers
            for fd, mask in events:
                handler = handlers.get(fd)
                if handler is not None:
                    try:
                        handler.on_events(fd, mask)
                    except Exception:
                        # Edge-triggered: the batch's other events come only once, so one
                        # handler's fault must not cost the other connections theirs.
                        log.exception("A relay failed handling its events.", fd=fd)
        finally:
            self._end_batch()

    def _run_again(self) -> None:
        self._again_scheduled = False
        if self.closed:
            return
        pending, self._again = self._again, []
        self._in_batch = True
        try:
            for callback in pending:
                _guarded(callback)
        finally:
            self._end_batch()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        if self.closed:
            return
        self._in_batch = True
        self._end_batch()

    def _end_batch(self) -> None:
        """Sweep the deadlines that are due, then close what the batch let go."""
        deadlines = self._deadlines
        if deadlines:
            now = self.loop.time()
            while deadlines and deadlines[0][0] <= now:
                _guarded(heapq.heappop(deadlines)[2])
            if deadlines and deadlines[0][0] < self._timer_at:
                self._timer_at = deadlines[0][0]
                self._timer = self.loop.call_at(self._timer_at, self._on_timer)
        closing = self._closing
        while closing:
            self._closing = []
            for sock in closing:
                sock.close()
            closing = self._closing
        self._in_batch = False
        self._close_if_unused()

    def close(self) -> None:
        """The loop is going: stop watching (the relays' sockets are closed by their owners)."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._deadlines.clear()
        loop = self._loop()
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._epoll.fileno())
        for sock in self._closing:
            sock.close()
        self._closing = []
        self._epoll.close()


def _guarded(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:
        log.exception("A relay's deferred work failed.")


_cores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventCore] = (
    weakref.WeakKeyDictionary()
)


def for_loop(loop: asyncio.AbstractEventLoop) -> EventCore:
    """The event core of `loop`, made on first use."""
    core = _cores.get(loop)
    if core is None or core.closed:
        core = _cores[loop] = EventCore(loop)
    return core
