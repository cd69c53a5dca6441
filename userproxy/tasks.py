"""Long-lived tasks, named and guarded (after kopf's `aiotasks`).

Every loop that should run for the life of the process (the sync runner, a source's watch,
a worker's supervisor) is started with `guarded`: when it fails or returns, that is logged
with its name at once, instead of surfacing, if ever, when someone awaits it. `first_exit`
runs a set of them until any one ends, then stops the rest within a bounded time, so the
process never runs on half-alive; it says which task ended and whether that was a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger("userproxy.tasks")

#: Seconds the other tasks get to finish once one has ended.
STOP_GRACE = 5.0


def guarded(coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
    """`coro` as a task that logs, with `name`, a failure or an unexpected return."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    task.add_done_callback(_report)
    return task


def background(coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
    """`coro` as a task that is expected to end (a batch of work): a failure is logged with
    `name`, a return is not."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    task.add_done_callback(_report_failure)
    return task


def _report_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _report(task)


def _report(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.error(
            "A long-lived task failed.",
            task=task.get_name(),
            exc_info=(type(error), error, error.__traceback__),
        )
    else:
        log.error("A long-lived task ended unexpectedly.", task=task.get_name())


@dataclass(frozen=True)
class Exit:
    """Which task ended first, and whether it failed (raised) or only returned."""

    task: str
    failed: bool
    result: Any = None


async def first_exit(tasks: Mapping[str, Awaitable[Any]]) -> Exit:
    """Run the named tasks (guarding coroutines) until one ends; cancel the others and
    wait up to STOP_GRACE for them. Cancelling the caller cancels them all."""
    running = {
        name: (t if isinstance(t, asyncio.Future) else guarded(_coro(t), name=name))
        for name, t in tasks.items()
    }
    names = {task: name for name, task in running.items()}
    try:
        done, _ = await asyncio.wait(running.values(), return_when=asyncio.FIRST_COMPLETED)
    finally:
        await stop_all(running.values())
    first = next(iter(done))
    failed = first.cancelled() or first.exception() is not None
    return Exit(names[first], failed, None if failed else first.result())


#: Pauses before restarting a failed task: doubling up to the last.
RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


async def restarting(
    start: Callable[[], Awaitable[Any]],
    *,
    name: str,
    on_failure: Callable[[], None] = lambda: None,
    on_recovery: Callable[[], None] = lambda: None,
    healthy_after: float = 5.0,
    delays: tuple[float, ...] = RESTART_DELAYS,
) -> None:
    """Run `start()` again whenever it fails or returns, with a growing pause; a cause is
    logged once while it repeats. `on_failure` runs at each failure, `on_recovery` once an
    attempt has run for `healthy_after` seconds (which also resets the pause)."""
    loop = asyncio.get_running_loop()
    failures, last_cause = 0, ""
    while True:
        started = loop.time()
        recovered = loop.call_later(healthy_after, on_recovery) if failures else None
        try:
            await start()
            cause = "it returned"
        except Exception as err:
            cause = f"{type(err).__name__}: {err}"
        finally:
            if recovered is not None:
                recovered.cancel()
        if loop.time() - started >= healthy_after:
            failures, last_cause = 0, ""
        delay = delays[min(failures, len(delays) - 1)]
        failures += 1
        on_failure()
        if cause != last_cause:
            log.error("A long-lived task ended; restarting it.", task=name, reason=cause,
                      retry_in=delay)  # fmt: skip
            last_cause = cause
        await asyncio.sleep(delay)


async def stop_all(tasks: Any) -> None:
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_GRACE):
                await asyncio.gather(*pending, return_exceptions=True)
        for task in pending:
            if not task.done():
                log.error("A task did not stop in time.", task=task.get_name())


async def _coro(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
