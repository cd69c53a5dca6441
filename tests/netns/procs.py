"""Processes of the sealed-namespace suites: the pods' backends and `userproxy run`."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.netns import topology as topo

BACKEND = str(Path(__file__).parent / "backend.py")


async def spawn(netns: str, *argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", netns, *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def start_backends(ns: dict[str, str]) -> list[asyncio.subprocess.Process]:
    """The backend of every pod (TCP and UDP :8080, answering with the pod's name), ready."""
    procs = []
    for pod in topo.POD_IPS:
        proc = await spawn(ns[pod], sys.executable, BACKEND, pod)
        procs.append(proc)
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"ready\n"
    return procs


async def start_userproxy(
    netns: str, *args: str, on_event: Callable[[dict[str, Any]], None] = lambda e: None
) -> asyncio.subprocess.Process:
    """`userproxy run ARGS --log-format json` in the namespace, once it says it is running;
    `on_event` sees every log event of the startup."""
    proxy = await spawn(
        netns, sys.executable, "-m", "userproxy", "run", *args, "--log-format", "json"
    )
    assert proxy.stderr is not None
    while True:
        line = await asyncio.wait_for(proxy.stderr.readline(), 15)
        assert line, "userproxy exited during startup"
        event = json.loads(line)
        on_event(event)
        if event["event"] == "userproxy is running.":
            return proxy


async def stop_all(procs: list[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
