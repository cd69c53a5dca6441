"""Zero-copy relaying for bulk TCP flows: each direction moves through a pipe with splice(2).

A relay starts on the event core (`tcp.Relay`: cheapest for connection setup and small
exchanges) and is handed here once it has moved `SPLICE_AFTER` bytes one way. The kernel then
moves the data from one socket's receive queue to the other's send queue by page reference: no
copy into Python, no bytes objects, one syscall pair per pipe-full.

The hand-over: the event core stops watching the two sockets (nothing of them is buffered in
the relay, a condition for the hand-over) and this module owns them from there, on the asyncio
loop's own readers, keeping the relay's contract:

- backpressure: a direction stops reading while its pipe cannot be emptied into the peer;
- a FIN is passed on as a FIN once the pipe is drained, and the other direction keeps going;
  when both directions are finished both sockets are closed;
- a reset or error on one side is passed on as a reset (SO_LINGER 0, then close).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import resource
import socket
import struct
from collections.abc import Callable

from userproxy.userspace.tcpstate import PAUSED_CHECK_INTERVAL, connection_gone

#: Bytes one direction of a relay moves on the event core before it is handed to splice. The
#: hand-over costs a few syscalls and two pipes; it pays off only for bulk transfers.
SPLICE_AFTER = 1024 * 1024
#: Pipe capacity per direction (pages are only allocated while data sits in the pipe).
PIPE_SIZE = 512 * 1024

_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_LINGER_RESET = struct.pack("ii", 1, 0)


def splice_supported() -> bool:
    return hasattr(os, "splice")


@functools.cache  # once per process (the CLI raises the limit before any listener exists)
def descriptor_budget() -> int:
    """How many relays may be spliced at once: each holds four more descriptors (two pipes),
    so at most a quarter of the descriptor limit goes to pipes, leaving room to accept."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(0, soft // 16) if soft != resource.RLIM_INFINITY else 1 << 20


class _Direction:
    __slots__ = (
        "check",
        "count",
        "dst",
        "eof",
        "finished",
        "in_pipe",
        "pipe_r",
        "pipe_w",
        "reading",
        "src",
    )

    def __init__(self, src: socket.socket, dst: socket.socket, count: Callable[[int], None]):
        self.src = src
        self.dst = dst
        self.count = count
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe still works
            fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.in_pipe = 0
        self.eof = False
        self.reading = False
        self.finished = False
        #: While blocked on its peer: the next look at whether `src` was reset meanwhile.
        self.check: asyncio.TimerHandle | None = None

    def close_pipe(self) -> None:
        os.close(self.pipe_r)
        os.close(self.pipe_w)


class SpliceRelay:
    """Both directions of one relay, spliced. `on_closed` runs once both sockets are closed."""

    #: Relays spliced now, in this process (checked against `descriptor_budget()`).
    active = 0

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        backend: socket.socket,
        *,
        to_backend: Callable[[int], None],
        to_client: Callable[[int], None],
        on_closed: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.client = client
        self.backend = backend
        self.on_closed = on_closed
        self.closed = False
        self.started = False
        upstream = _Direction(client, backend, to_backend)  # may fail: out of descriptors
        try:
            downstream = _Direction(backend, client, to_client)
        except OSError:
            upstream.close_pipe()
            raise
        self.directions = (upstream, downstream)
        self._fds = (client.fileno(), backend.fileno())

    def start(self) -> None:
        SpliceRelay.active += 1
        self.started = True
        for direction in self.directions:
            self._start_reading(direction)

    # ---------------------------------------------------------------- moving data
    def _readable(self, direction: _Direction) -> None:
        if self.closed:  # an event collected before the close
            return
        try:
            moved = os.splice(direction.src.fileno(), direction.pipe_w, PIPE_SIZE, flags=_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.reset()
            return
        if moved == 0:
            direction.eof = True
            self._stop_reading(direction)
        direction.in_pipe += moved
        self._drain(direction)

    def _drain(self, direction: _Direction) -> None:
        while direction.in_pipe:
            try:
                moved = os.splice(
                    direction.pipe_r, direction.dst.fileno(), direction.in_pipe, flags=_FLAGS
                )
            except (BlockingIOError, InterruptedError):
                # The peer's send queue is full: stop reading until it drains (and look at
                # the unread side now and then, see tcpstate).
                self._stop_reading(direction)
                self.loop.add_writer(direction.dst.fileno(), self._writable, direction)
                if direction.check is None:
                    direction.check = self.loop.call_later(
                        PAUSED_CHECK_INTERVAL, self._check_blocked, direction
                    )
                return
            except OSError:
                self.reset()
                return
            direction.in_pipe -= moved
            direction.count(moved)
        if direction.eof:
            self._finish(direction)
        elif not direction.reading and not self.closed:
            self._start_reading(direction)

    def _check_blocked(self, direction: _Direction) -> None:
        direction.check = None
        if self.closed or direction.reading:
            return
        if connection_gone(direction.src):
            self.reset()
            return
        direction.check = self.loop.call_later(
            PAUSED_CHECK_INTERVAL, self._check_blocked, direction
        )

    def _writable(self, direction: _Direction) -> None:
        if self.closed:
            return
        self.loop.remove_writer(direction.dst.fileno())
        self._drain(direction)

    # ---------------------------------------------------------------- ends
    def _finish(self, direction: _Direction) -> None:
        """This direction's sender is done and everything it sent was passed on."""
        if direction.finished:
            return
        direction.finished = True
        if all(d.finished for d in self.directions):
            self.close()
            return
        with contextlib.suppress(OSError):
            direction.dst.shutdown(socket.SHUT_WR)

    def reset(self) -> None:
        """A side failed, or the relay is torn down: both peers see a reset."""
        for sock in (self.client, self.backend):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.started:
            SpliceRelay.active -= 1
        for fd in self._fds:
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)
        for direction in self.directions:
            if direction.check is not None:
                direction.check.cancel()
            direction.close_pipe()
        self.client.close()
        self.backend.close()
        self.on_closed()

    # ---------------------------------------------------------------- loop registration
    def _start_reading(self, direction: _Direction) -> None:
        direction.reading = True
        self.loop.add_reader(direction.src.fileno(), self._readable, direction)

    def _stop_reading(self, direction: _Direction) -> None:
        if direction.reading:
            direction.reading = False
            self.loop.remove_reader(direction.src.fileno())
