"""The sync runner's pause (a hand-over stops the rule writes of the process handing over)."""

from __future__ import annotations

import asyncio

from userproxy.runner import SyncRunner


async def test_pause_waits_for_the_sync_in_flight_and_holds_the_next_until_resume() -> None:
    started, release = asyncio.Event(), asyncio.Event()
    syncs = 0

    async def sync() -> None:
        nonlocal syncs
        syncs += 1
        started.set()
        await release.wait()

    runner = SyncRunner(sync, min_interval=0.0, max_interval=60.0)
    loop_task = asyncio.ensure_future(runner.run_forever())
    await asyncio.wait_for(started.wait(), 2)  # the first sync is in flight
    pausing = asyncio.ensure_future(runner.pause())
    await asyncio.sleep(0.05)
    assert not pausing.done()  # it waits for the sync in flight
    release.set()
    await asyncio.wait_for(pausing, 2)
    runner.request()
    await asyncio.sleep(0.1)
    assert syncs == 1  # paused: the request waits
    runner.resume()
    for _ in range(100):
        if syncs == 2:
            break
        await asyncio.sleep(0.01)
    assert syncs == 2
    loop_task.cancel()
    await asyncio.gather(loop_task, return_exceptions=True)
