"""Descriptor exhaustion: `userproxy run --manifests DIR` with a low descriptor limit, driven
out of descriptors by held connections. It must stay up (the directory scan fails and is
retried, new connections are shed), serve again within a second once descriptors are free,
and remove its rules on exit even while out of descriptors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.netns.topology import bare, socket_in
from userproxy.objects import endpoint_slice, service

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]
LIMIT = 96
HELD = 150  # more connections than the proxy has descriptors for


def nat_rules(netns: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", netns, "iptables-save", "-t", "nat"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


async def _read_all(stream: asyncio.StreamReader, into: list[bytes]) -> None:
    while line := await stream.readline():
        into.append(line)


async def until_served(netns: str, port: int, log: list[bytes]) -> object:
    """A connection that is relayed, within a second of descriptors being freed."""
    deadline = time.monotonic() + 1.0
    while True:
        try:
            sock = await connect(netns, port)
        except OSError:
            if time.monotonic() > deadline:
                shown = b"".join(ln for ln in log if b"No endpoint" not in ln)[-3000:]
                pytest.fail(f"not served again within a second:\n{shown.decode()}")
            await asyncio.sleep(0.05)
            continue
        return sock


async def connect(netns: str, port: int) -> object:
    sock = socket_in(netns)
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), 2
        )
    except BaseException:
        sock.close()
        raise
    return sock


async def test_out_of_descriptors_the_proxy_stays_up_recovers_and_cleans_up(
    tmp_path: Path,
) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    with bare("e") as netns:
        up = ["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"]
        await asyncio.to_thread(subprocess.run, up, check=True)
        backend = socket_in(netns)
        backend.bind(("127.0.0.1", 0))
        backend.listen(1024)
        backend_port = backend.getsockname()[1]
        (manifests / "svc.yaml").write_text(
            yaml.safe_dump_all(
                [
                    service("web", cluster_ip="10.96.0.10", ports=[("http", 80)]),
                    endpoint_slice("web", addresses=["127.0.0.1"], ports=[("http", backend_port)]),
                ]
            )
        )
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", netns, "prlimit", f"--nofile={LIMIT}:{LIMIT}",
            sys.executable, "-m", "userproxy", "run", "--manifests", str(manifests),
            "--portals", "on", "--log-format", "json", "--healthz-bind-address", "",
            "--metrics-bind-address", "", stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        held: list[object] = []
        try:
            assert proc.stderr is not None
            port, running = 0, False
            deadline = time.monotonic() + 20
            while not running and time.monotonic() < deadline:
                line = await asyncio.wait_for(proc.stderr.readline(), 20)
                event = json.loads(line) if line.startswith(b"{") else {}
                port = event.get("proxy_port", port)
                running = event.get("event") == "userproxy is running."
            assert port and running, "the proxy never started"
            log: list[bytes] = []
            drain = asyncio.ensure_future(_read_all(proc.stderr, log))
            for _ in range(HELD):
                try:
                    held.append(await connect(netns, port))
                except (OSError, TimeoutError):
                    break
            await asyncio.sleep(2.5)  # a few directory scans while out of descriptors
            assert proc.returncode is None, "the proxy died out of descriptors"
            for sock in held:
                sock.close()  # type: ignore[attr-defined]
            held.clear()
            fresh = await until_served(netns, port, log)  # serving again, within a second
            fresh.close()  # type: ignore[attr-defined]
            for _ in range(HELD):  # out of descriptors again, then stopped
                try:
                    held.append(await connect(netns, port))
                except (OSError, TimeoutError):
                    break
            rules = nat_rules(netns)
            if "10.96.0.10/32" not in rules:  # pragma: no cover - say what happened
                proc.kill()
                await proc.wait()
                await drain
                lines = [ln for ln in log if b"No endpoint accepted" not in ln]
                pytest.fail(b"".join(lines).decode()[:4000])
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 20)
            assert "KUBE-PORTALS" not in nat_rules(netns)  # cleaned up even so
        finally:
            for sock in held:
                sock.close()  # type: ignore[attr-defined]
            backend.close()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
