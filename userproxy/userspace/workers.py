"""`--workers N`: the data plane in N processes on the same proxy ports (SO_REUSEPORT).

The leader (the `userproxy run` process) keeps everything else: the source, the sync runner,
the portals, the health and metrics servers. After every change it sends the workers a
snapshot of the data plane (per service port: proxy port, affinity, endpoints) over a
socketpair; each worker opens the same listeners with SO_REUSEPORT and balances on its own.
Workers send their traffic counters back every second, so `ls` and `/metrics` add them up.

ClientIP affinity across processes: the kernel would spread a client's connections over the
group by 4-tuple hash. A classic-BPF reuseport program makes it pick the socket by the
client's IPv4 address instead (`ld [net+12]; mod N`), so one client always lands in the
same process, whose balancer holds its affinity. (IPv6 clients fall back to the kernel's
hash: the program reads an IPv4 header field.)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import structlog

from userproxy.model import Affinity, Endpoint, Protocol, ServicePort, ServicePortName
from userproxy.userspace.stats import CountersSnapshot, snapshot

log = structlog.get_logger("userproxy.userspace.workers")

SO_ATTACH_REUSEPORT_CBPF = 51
SKF_NET_OFF = -0x100000
_BPF_LD_W_ABS, _BPF_ALU_MOD_K, _BPF_RET_A = 0x20, 0x94, 0x16


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def steer_by_client_ip(sock: socket.socket, workers: int) -> None:
    """Attach the reuseport program choosing socket `src_ip mod workers` of the group."""
    program = (_SockFilter * 3)(
        _SockFilter(_BPF_LD_W_ABS, 0, 0, (SKF_NET_OFF + 12) & 0xFFFFFFFF),  # IPv4 source
        _SockFilter(_BPF_ALU_MOD_K, 0, 0, workers),
        _SockFilter(_BPF_RET_A, 0, 0, 0),
    )
    fprog = _SockFprog(3, program)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))


# ----------------------------------------------------------------------------- wire format
def encode_state(ports: list[tuple[ServicePort, int, list[Endpoint]]]) -> bytes:
    """The data-plane snapshot the leader sends: one JSON line."""
    items = [
        {
            "ns": p.name.namespace,
            "name": p.name.name,
            "port": p.name.port,
            "protocol": p.protocol.value,
            "cluster_ip": p.cluster_ip,
            "service_port": p.port,
            "affinity": [p.affinity.client_ip, p.affinity.timeout_s],
            "proxy_port": proxy_port,
            "endpoints": [[e.ip, e.port] for e in endpoints],
        }
        for p, proxy_port, endpoints in ports
    ]
    return json.dumps(items, separators=(",", ":")).encode() + b"\n"


def decode_state(line: bytes) -> list[tuple[ServicePort, int, list[Endpoint]]]:
    out = []
    for item in json.loads(line):
        name = ServicePortName(item["ns"], item["name"], item["port"], Protocol(item["protocol"]))
        port = ServicePort(
            name,
            item["cluster_ip"],
            item["service_port"],
            affinity=Affinity(bool(item["affinity"][0]), int(item["affinity"][1])),
        )
        out.append(
            (port, int(item["proxy_port"]), [Endpoint(ip, p) for ip, p in item["endpoints"]])
        )
    return out


Counters = dict[str, dict[str, CountersSnapshot]]  # service port -> endpoint -> counters


def encode_counters(counters: Counters) -> bytes:
    body = {
        n: {e: list(dataclasses.astuple(c)) for e, c in eps.items()} for n, eps in counters.items()
    }
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def decode_counters(line: bytes) -> Counters:
    return {
        n: {e: CountersSnapshot(*values) for e, values in eps.items()}
        for n, eps in json.loads(line).items()
    }


# ----------------------------------------------------------------------------- leader side
class WorkerPool:
    def __init__(self, count: int, worker_args: list[str]) -> None:
        self.count = count
        self.worker_args = worker_args
        self.procs: list[asyncio.subprocess.Process] = []
        self._channels: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: asyncio.Handle | None = None
        #: Per worker, its latest counters.
        self.counters: dict[int, Counters] = {}
        self.state: Callable[[], bytes] = lambda: b"[]\n"

    async def start(self) -> None:
        for index in range(1, self.count):
            ours, theirs = socket.socketpair()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "userproxy", "_worker", "--channel-fd", str(theirs.fileno()),
                *self.worker_args, pass_fds=(theirs.fileno(),),
            )  # fmt: skip
            theirs.close()
            reader, writer = await asyncio.open_connection(sock=ours)
            self.procs.append(proc)
            self._channels.append((reader, writer))
            self._tasks.append(asyncio.create_task(self._read(index, reader)))
        log.info("Started the worker processes.", workers=self.count)

    async def _read(self, index: int, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            self.counters[index] = decode_counters(line)
        log.error("A worker process ended; its connections are gone.", worker=index)

    def publish(self) -> None:
        """Send the current snapshot soon (once per loop turn, however many changes)."""
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._pending = None
        line = self.state()
        for _, writer in self._channels:
            if not writer.is_closing():
                writer.write(line)

    def extra_counters(self) -> Counters:
        total: Counters = {}
        for counters in self.counters.values():
            for name, eps in counters.items():
                mine = total.setdefault(name, {})
                for ep, c in eps.items():
                    mine[ep] = mine.get(ep, CountersSnapshot()) + c
        return total

    async def stop(self) -> None:
        for _, writer in self._channels:
            writer.close()
        for proc in self.procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in self.procs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 10)
        for task in self._tasks:
            task.cancel()


# ----------------------------------------------------------------------------- worker side
async def run_worker(channel_fd: int, settings: Any) -> int:
    """A worker: follow the leader's snapshots with listeners and balancers of its own."""
    from userproxy.userspace.proxier import Proxier

    proxier = Proxier(settings=settings)
    sock = socket.socket(fileno=channel_fd)
    reader, writer = await asyncio.open_connection(sock=sock)

    async def report() -> None:
        while True:
            await asyncio.sleep(1.0)
            counters = {
                str(name): {str(ep): snapshot(c) for ep, c in rt.stats.endpoints.items()}
                for name, rt in proxier.runtimes.items()
            }
            writer.write(encode_counters(counters))

    reporter = asyncio.get_running_loop().create_task(report())
    try:
        while line := await reader.readline():
            await proxier.follow(decode_state(line))
    finally:
        reporter.cancel()
        await proxier.shutdown()
    log.info("The leader went away; worker stopping.", pid=os.getpid())
    return 0
