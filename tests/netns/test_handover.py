"""Restarts under load, in sealed namespaces: the real `userproxy run` hands its sockets to a
successor (nothing refused, established connections survive), and a process started after a
SIGKILL serves the ports the dead one's rules point at.

A client in a pod keeps opening connections through the ClusterIP and the NodePort and
sending datagrams, while five long-lived connections stream data; every answer is checked."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.netns import topology as topo
from tests.netns.procs import start_backends, start_userproxy, stop_all
from userproxy.objects import endpoint_slice, service

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]
VIP, NODE_PORT = "10.96.0.30", 30090
PODS = set(topo.POD_IPS)
RUN_ARGS = ("--drain-timeout", "20s", "--iptables-sync-period", "2s")


def manifest() -> list[dict[str, Any]]:
    web = service(
        "web",
        cluster_ip=VIP,
        type="NodePort",
        ports=[
            {"name": "tcp", "port": 80, "nodePort": NODE_PORT},
            {"name": "udp", "port": 80, "protocol": "UDP"},
        ],
    )
    pods = list(topo.POD_IPS.values())
    return [web, endpoint_slice("web", addresses=pods, ports=[("tcp", 8080), ("udp", 8080, "UDP")])]


@dataclass
class Proxy:
    proc: asyncio.subprocess.Process
    events: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    def follow(self) -> None:
        """Keep reading its log (so it never blocks on a full pipe), remembering events."""

        async def read() -> None:
            assert self.proc.stderr is not None
            while line := await self.proc.stderr.readline():
                self.events.append(json.loads(line))

        self.reader = asyncio.ensure_future(read())

    def saw(self, event: str) -> bool:
        return any(e["event"] == event for e in self.events)


async def start(ns: dict[str, str], path: Path, *extra: str) -> Proxy:
    events: list[dict[str, Any]] = []
    proc = await start_userproxy(
        ns["node"], "--manifests", str(path), *RUN_ARGS, *extra, on_event=events.append
    )
    proxy = Proxy(proc, events)
    proxy.follow()
    return proxy


@dataclass
class Load:
    """New connections (ClusterIP and NodePort) and datagrams, one after another, checked."""

    ns: dict[str, str]
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        targets = [(VIP, 80), (topo.NODE_IP, NODE_PORT)]
        deadline = time.monotonic() + 60  # bounded whatever happens
        i = 0
        while not self.stop.is_set() and time.monotonic() < deadline:
            host, port = targets[i % 2]
            i += 1
            try:
                answer = await self._tcp(host, port)
                udp = await self._udp()
            except (OSError, TimeoutError) as err:
                self.failures.append(f"{host}:{port} {type(err).__name__} {err}")
                continue
            if answer not in PODS or udp not in PODS:
                self.failures.append(f"wrong answer {answer!r} / {udp!r}")
            else:
                self.ok += 1

    async def _tcp(self, host: str, port: int) -> str:
        loop = asyncio.get_running_loop()
        sock = topo.socket_in(self.ns["pod1"])
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 3)
            return (await asyncio.wait_for(loop.sock_recv(sock, 100), 3)).decode().strip()
        finally:
            sock.close()

    async def _udp(self) -> str:
        loop = asyncio.get_running_loop()
        sock = topo.socket_in(self.ns["pod1"], socket.SOCK_DGRAM)
        try:
            sock.connect((VIP, 80))
            for _ in range(3):  # a datagram may be lost in a switch, as on any network
                await loop.sock_sendall(sock, b"hi")
                try:
                    return (await asyncio.wait_for(loop.sock_recv(sock, 100), 1)).decode().strip()
                except TimeoutError:
                    continue
            raise TimeoutError("no UDP answer in 3 tries")
        finally:
            sock.close()


class Stream:
    """A long-lived connection through the ClusterIP: every chunk sent must come back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, ns: dict[str, str]) -> Stream:
        sock = topo.socket_in(ns["pod2"])
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (VIP, 80)), 3)
        reader, writer = await asyncio.open_connection(sock=sock)
        assert (await asyncio.wait_for(reader.readline(), 3)).decode().strip() in PODS
        return cls(reader, writer)

    async def echo(self, n: int) -> bool:
        payload = os.urandom(32 * 1024) + n.to_bytes(4, "big")
        self.writer.write(payload)
        await self.writer.drain()
        try:
            got = await asyncio.wait_for(self.reader.readexactly(len(payload)), 5)
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            return False
        return got == payload

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[dict[str, str], Path, list[Any]]]:
    ns = topo.create()
    procs: list[Any] = []
    try:
        procs += await start_backends(ns)
        path = tmp_path / "svc.yaml"
        path.write_text(yaml.safe_dump_all(manifest()))
        yield ns, path, procs
    finally:
        await stop_all([p.proc if isinstance(p, Proxy) else p for p in procs])
        topo.destroy(ns)


def proxy_ports(proxy: Proxy) -> dict[str, int]:
    return {e["service"]: e["proxy_port"] for e in proxy.events if "proxy_port" in e}


MODES = {
    "userspace": ("--workers", "1"),
    "userspace --workers 2": ("--workers", "2"),
    "iptables mode": ("--proxy-mode", "iptables"),
}


@pytest.mark.parametrize("mode", MODES)
async def test_a_hand_over_refuses_nothing_and_keeps_established_connections(
    node: tuple[dict[str, str], Path, list[Any]], mode: str
) -> None:
    ns, path, procs = node
    old = await start(ns, path, *MODES[mode])
    procs.append(old)
    streams = [await Stream.open(ns) for _ in range(5)]
    load = Load(ns)
    loading = asyncio.ensure_future(load.run())
    await asyncio.sleep(0.5)

    new = await start(ns, path, *MODES[mode])
    procs.append(new)
    assert new.saw("Taking over from the running userproxy.")
    await asyncio.sleep(1.0)  # the new process serves; the old one drains
    assert proxy_ports(new) == proxy_ports(old)  # the same sockets, so the same rules
    kernel = mode == "iptables mode"  # the kernel relays: nothing for the old one to drain
    assert kernel or old.proc.returncode is None, "the old process must drain, not exit"
    assert old.saw("Handed over; draining the established connections.")
    assert not [e for e in old.events + new.events if e["level"] in ("error", "critical")]
    assert all([await s.echo(i) for i, s in enumerate(streams)]), "a long-lived stream broke"

    load.stop.set()
    await loading
    assert load.failures == [], load.failures[:5]
    assert load.ok > 10

    for s in streams:
        s.close()
    assert await asyncio.wait_for(old.proc.wait(), 10) == 0  # drained: exits by itself
    # The rules stayed (the new process serves them), so traffic flows on.
    assert await Load(ns)._tcp(VIP, 80) in PODS
    # And the new process can hand over in turn (the old one left its offer alone).
    third = await start(ns, path, *MODES[mode])
    procs.append(third)
    assert third.saw("Taking over from the running userproxy.")
    assert await asyncio.wait_for(new.proc.wait(), 10) == 0


async def test_a_restart_after_sigkill_serves_the_same_ports_at_once(
    node: tuple[dict[str, str], Path, list[Any]],
) -> None:
    ns, path, procs = node
    first = await start(ns, path)
    procs.append(first)
    before = {k: v for k, v in proxy_ports(first).items()}
    assert before
    first.proc.send_signal(signal.SIGKILL)
    await first.proc.wait()

    started = time.monotonic()
    second = await start(ns, path)
    procs.append(second)
    assert proxy_ports(second) == before  # the journal's ports: the rules left are right
    load = Load(ns)
    loading = asyncio.ensure_future(load.run())
    await asyncio.sleep(3)
    load.stop.set()
    await loading
    assert load.failures == [], load.failures[:5]
    assert time.monotonic() - started < 10


async def test_sigterm_with_a_successor_wait_hands_over_to_the_next_process(
    node: tuple[dict[str, str], Path, list[Any]],
) -> None:
    ns, path, procs = node
    old = await start(ns, path, "--successor-wait", "15s")
    procs.append(old)
    load = Load(ns)
    loading = asyncio.ensure_future(load.run())
    await asyncio.sleep(0.3)
    old.proc.send_signal(signal.SIGTERM)  # a DaemonSet pod being replaced
    await asyncio.sleep(1.0)
    assert old.proc.returncode is None  # still serving, waiting for its successor
    new = await start(ns, path)
    procs.append(new)
    assert await asyncio.wait_for(old.proc.wait(), 10) == 0
    load.stop.set()
    await loading
    assert load.failures == [], load.failures[:5]
    assert old.saw("Handed over; draining the established connections.")


async def test_sigterm_with_no_successor_leaves_the_rules_and_the_ports_to_the_next(
    node: tuple[dict[str, str], Path, list[Any]],
) -> None:
    ns, path, procs = node
    old = await start(ns, path, "--successor-wait", "500ms")
    procs.append(old)
    before = proxy_ports(old)
    old.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(old.proc.wait(), 10) == 0
    assert VIP in topo.run_in(ns["node"], "iptables-save", "-t", "nat") + topo.run_in(
        ns["node"], "iptables-legacy-save", "-t", "nat"
    )
    new = await start(ns, path)
    procs.append(new)
    assert proxy_ports(new) == before
    assert await Load(ns)._tcp(VIP, 80) in PODS


async def test_entries_made_while_the_rules_were_gone_do_not_outlive_the_gap(
    node: tuple[dict[str, str], Path, list[Any]],
) -> None:
    """A client that keeps its source port (as DNS resolvers and many UDP clients do) sends
    while the rules are flushed from outside; once they are healed it must be answered, not
    stuck on the entry the gap left (which its own datagrams would keep alive forever)."""
    ns, path, procs = node
    proxy = await start(ns, path)
    procs.append(proxy)
    loop = asyncio.get_running_loop()
    sock = topo.socket_in(ns["pod1"], socket.SOCK_DGRAM)
    try:
        sock.bind(("0.0.0.0", 40123))
        sock.connect((VIP, 80))
        for tool in ("iptables-nft", "iptables-legacy"):
            topo.run_in(ns["node"], "sh", "-c", f"{tool} -t nat -F PREROUTING 2>/dev/null || true")
        answered = False
        deadline = time.monotonic() + 15  # the sync period is 2 s
        while time.monotonic() < deadline and not answered:
            await loop.sock_sendall(sock, b"hi")
            try:
                answer = await asyncio.wait_for(loop.sock_recv(sock, 100), 0.5)
                answered = answer.decode().strip() in PODS
            except TimeoutError:
                continue
        assert answered, "the client's source port stayed stuck on the gap's entry"
    finally:
        sock.close()
