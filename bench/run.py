"""The data-plane and control-plane benchmark: userproxy beside its peers, in one interleaved run.

    sudo python3 bench/run.py            # about 6 minutes; results in bench/results/

Topology (bench/netns.py): client -> proxy node -> two backend namespaces, all sealed. Peers:
  none            the client talks to a backend directly (routed through the node)
  kernel DNAT     iptables DNAT on the node, statistic-random over the backends (the limit)
  haproxy         HAProxy 2.6, mode tcp, its defaults, one thread
  haproxy-tuned   the same with forced splice both ways (splice-request/response), one thread
  userproxy       `userproxy run --kubeconfig` (the fake API server), portals on, one process
  userproxy --workers 2     the same with two data-plane processes (after the rounds)
  userproxy iptables mode   the same with `--proxy-mode iptables` (after the rounds)
  userproxy nftables mode   the same with `--proxy-mode nftables` (after the rounds)
Workloads: iperf3 TCP bulk 1 and 8 streams; wrk new connections (Connection: close) and
keep-alive requests with p50/p99 (nginx backends); 64-byte echo round trips; iperf3 UDP
64-byte datagrams at a fixed offered rate (pps received, loss); proxy RSS per idle connection
(3,000 held open). Each round runs every workload for every peer, peers in rotating order;
medians over the rounds. Control plane (userproxy): time and RSS to serve 1,000 and 10,000
service ports (listeners and rules), with iptables-nft portals and with nftables portals
(`nft_` keys), and the delay from an endpoint change in the API to new
connections using it; a hand-over and a crash restart under steady new-connection load
(connections failed, long-lived connections lost, time to serve again).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.netns import BACKENDS, NODE_CLIENT_SIDE, Topology, rss_kib  # noqa: E402
from tests.fakekube import FakeKube  # noqa: E402
from userproxy.objects import endpoint_slice, service  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PEERS = ["none", "kernel DNAT", "haproxy", "haproxy-tuned", "userproxy"]
UDP_PEERS = ["none", "kernel DNAT", "userproxy"]
#: Measured after the interleaved rounds: the two userproxy modes cannot run side by side.
IPTABLES_MODE = "userproxy iptables mode"
NFTABLES_MODE = "userproxy nftables mode"
TWO_WORKERS = "userproxy --workers 2"
#: Peers measured one after the other once the rounds are done, with their extra flags.
AFTER_ROUNDS = {
    TWO_WORKERS: ["--workers", "2"],
    IPTABLES_MODE: ["--proxy-mode", "iptables"],
    NFTABLES_MODE: ["--proxy-mode", "nftables"],
}
ALL_PEERS = [*PEERS, *AFTER_ROUNDS]
WEB, ECHO, IPERF = 80, 7, 5201
UDP_RATE_PPS = 100_000
IDLE_CONNECTIONS = 3000
TARGETS: dict[str, dict[str, tuple[str, int]]] = {
    "none": {"web": (BACKENDS["be1"], WEB), "echo": (BACKENDS["be1"], ECHO),
             "iperf": (BACKENDS["be1"], IPERF)},
    "kernel DNAT": {"web": ("10.97.0.10", WEB), "echo": ("10.97.0.11", ECHO),
                    "iperf": ("10.97.0.12", IPERF)},
    "haproxy": {"web": (NODE_CLIENT_SIDE, 8080), "echo": (NODE_CLIENT_SIDE, 8007),
                "iperf": (NODE_CLIENT_SIDE, 5301)},
    "haproxy-tuned": {"web": (NODE_CLIENT_SIDE, 9080), "echo": (NODE_CLIENT_SIDE, 9007),
                      "iperf": (NODE_CLIENT_SIDE, 5401)},
    "userproxy": {"web": ("10.96.0.10", WEB), "echo": ("10.96.0.11", ECHO),
                  "iperf": ("10.96.0.12", IPERF)},
    IPTABLES_MODE: {"web": ("10.96.0.10", WEB), "echo": ("10.96.0.11", ECHO),
                    "iperf": ("10.96.0.12", IPERF)},
    NFTABLES_MODE: {"web": ("10.96.0.10", WEB), "echo": ("10.96.0.11", ECHO),
                    "iperf": ("10.96.0.12", IPERF)},
    TWO_WORKERS: {"web": ("10.96.0.10", WEB), "echo": ("10.96.0.11", ECHO),
                  "iperf": ("10.96.0.12", IPERF)},
}  # fmt: skip


# ----------------------------------------------------------------------------- setup
NGINX = """
worker_processes 1; daemon off; pid {dir}/nginx.pid; error_log {dir}/error.log;
events {{ worker_connections 16384; }}
http {{
  access_log off; keepalive_requests 100000000; keepalive_timeout 300s;
  client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
  uwsgi_temp_path {dir}; scgi_temp_path {dir};
  server {{ listen 80 backlog=4096 reuseport; location / {{ return 200 "{name}\\n"; }} }}
}}
"""

HAPROXY = """
global
  nbthread 1
  maxconn 4000
defaults
  mode tcp
  timeout connect 5s
  timeout client 300s
  timeout server 300s
{extra}
frontend web
  bind {node}:{web}
  default_backend web
backend web
  balance roundrobin
  server be1 {be1}:80
  server be2 {be2}:80
frontend echo
  bind {node}:{echo}
  default_backend echo
backend echo
  balance roundrobin
  server be1 {be1}:7
  server be2 {be2}:7
frontend iperf
  bind {node}:{iperf}
  default_backend iperf
backend iperf
  server be1 {be1}:5201
"""


class Bench:
    def __init__(self, topo: Topology, work: Path) -> None:
        self.topo = topo
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pids: dict[str, list[int]] = {}
        self.fake = FakeKube()

    def spawn(self, where: str, *argv: str, ready: str | None = None) -> subprocess.Popen[bytes]:
        proc = self.topo.spawn(
            where, *argv, stdout=subprocess.PIPE if ready else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.procs.append(proc)
        if ready:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()
            assert ready in line, f"{argv[0]} did not start: {line!r}"
        return proc

    def start_backends(self) -> None:
        for be in BACKENDS:
            d = self.work / be
            d.mkdir()
            conf = d / "nginx.conf"
            conf.write_text(NGINX.format(dir=d, name=be))
            self.spawn(be, "nginx", "-c", str(conf))
            self.spawn(
                be, sys.executable, str(ROOT / "bench" / "echo.py"), str(ECHO), ready="ready"
            )
        self.spawn("be1", "iperf3", "-s", "-p", str(IPERF))
        time.sleep(0.5)

    def start_dnat(self) -> None:
        be1, be2 = BACKENDS["be1"], BACKENDS["be2"]
        rules = ["*nat", ":BENCH-DNAT - [0:0]", "-A PREROUTING -j BENCH-DNAT"]
        for vip, port in (("10.97.0.10", WEB), ("10.97.0.11", ECHO)):
            match = f"-A BENCH-DNAT -d {vip}/32 -p tcp -m tcp --dport {port}"
            rules += [
                f"{match} -m statistic --mode random --probability 0.5 -j DNAT "
                f"--to-destination {be1}:{port}",
                f"{match} -j DNAT --to-destination {be2}:{port}",
            ]
        for proto in ("tcp", "udp"):
            rules.append(f"-A BENCH-DNAT -d 10.97.0.12/32 -p {proto} -m {proto} --dport {IPERF} "
                         f"-j DNAT --to-destination {be1}:{IPERF}")  # fmt: skip
        rules.append("COMMIT")
        subprocess.run(self.topo.argv("node", "iptables-nft-restore", "--noflush"),
                       input="\n".join(rules) + "\n", text=True, check=True)  # fmt: skip

    def start_haproxy(self) -> None:
        for name, web, echo, iperf, extra in (
            ("haproxy", 8080, 8007, 5301, ""),
            (
                "haproxy-tuned",
                9080,
                9007,
                5401,
                "  option splice-request\n  option splice-response",
            ),
        ):
            conf = self.work / f"{name}.cfg"
            be1, be2 = BACKENDS["be1"], BACKENDS["be2"]
            text = HAPROXY.format(extra=extra, node=NODE_CLIENT_SIDE, web=web, echo=echo,
                                  iperf=iperf, be1=be1, be2=be2)  # fmt: skip
            conf.write_text(text)
            proc = self.spawn("node", "haproxy", "-f", str(conf), "-db")
            self.pids[name] = [proc.pid]
        time.sleep(0.5)

    async def start_api(self) -> None:
        sock = self.topo.call("node", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        sock.bind(("127.0.0.1", 0))
        await self.fake.start(sock=sock)
        be = list(BACKENDS.values())
        self.fake.apply(service("web", cluster_ip="10.96.0.10", ports=[("http", WEB)]))
        self.fake.apply(endpoint_slice("web", addresses=be, ports=[("http", WEB)]))
        self.fake.apply(service("echo", cluster_ip="10.96.0.11", ports=[("echo", ECHO)]))
        self.fake.apply(endpoint_slice("echo", addresses=be, ports=[("echo", ECHO)]))
        self.fake.apply(service("iperf", cluster_ip="10.96.0.12",
                                ports=[("tcp", IPERF), ("udp", IPERF, "UDP")]))  # fmt: skip
        self.fake.apply(endpoint_slice("iperf", addresses=be[:1],
                                       ports=[("tcp", IPERF), ("udp", IPERF, "UDP")]))  # fmt: skip

    async def start_userproxy(
        self, extra: list[str] | None = None, peer: str = "userproxy"
    ) -> subprocess.Popen[bytes]:
        kubeconfig = self.fake.kubeconfig(self.work / "kubeconfig")
        # USERPROXY_PROFILE=FILE runs userproxy under cProfile (for finding what to tune).
        profile = os.environ.get("USERPROXY_PROFILE")
        wrap = ["-m", "cProfile", "-o", profile] if profile else []
        proc = self.topo.spawn(
            "node", sys.executable, *wrap, "-m", "userproxy", "run",
            "--kubeconfig", str(kubeconfig), *(extra or []),
            "--iptables-backend", "nft", "--iptables-min-sync-period", "0s",
            "--log-format", "json", stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.procs.append(proc)
        self.pids[peer] = [proc.pid]
        await asyncio.to_thread(wait_running, proc)
        return proc

    def fresh_conntrack(self) -> None:
        """Every measurement starts with an empty conntrack table: tens of thousands of
        TIME_WAIT entries from the previous workload would otherwise slow the next one."""
        subprocess.run(self.topo.argv("node", "conntrack", "-F"), capture_output=True, check=False)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_running(
    proc: subprocess.Popen[bytes], timeout: float = 120
) -> tuple[float, dict[str, Any]]:
    """Read userproxy's JSON log until it is running; returns the seconds that took and the
    "running" log event (it holds the first sync's duration)."""
    started = time.monotonic()
    assert proc.stderr is not None
    while time.monotonic() - started < timeout:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError("userproxy exited during startup")
        event = json.loads(line)
        if event.get("event") == "userproxy is running.":
            took = time.monotonic() - started
            # Keep draining the log so the process never blocks on a full pipe.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return took, event
    raise RuntimeError("userproxy did not start in time")


# ----------------------------------------------------------------------------- workloads
def iperf(b: Bench, *args: str) -> dict[str, Any]:
    """iperf3 -J, retried while the server is still busy with the previous test."""
    for attempt in range(5):
        proc = subprocess.run(b.topo.argv("cli", "iperf3", "-J", *args), capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip
        result: dict[str, Any] = json.loads(proc.stdout or "{}")
        if "error" not in result and proc.returncode == 0:
            return result
        time.sleep(0.5 * (attempt + 1))
    raise RuntimeError(f"iperf3 {' '.join(args)}: {result.get('error', proc.stderr)}")


def cpu_seconds(b: Bench, peer: str) -> float | None:
    """User+system CPU of the peer's processes and their children (workers), or None for
    the peers whose traffic no process carries (no proxy, kernel DNAT, the kernel modes)."""
    if peer not in b.pids or peer in (IPTABLES_MODE, NFTABLES_MODE):
        return None
    ticks = 0
    todo = list(b.pids[peer])
    while todo:
        pid = todo.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def iperf_tcp(b: Bench, peer: str, streams: int) -> dict[str, float]:
    host, port = TARGETS[peer]["iperf"]
    before = cpu_seconds(b, peer)
    result = iperf(b, "-c", host, "-p", str(port), "-t", "3", "-P", str(streams))
    after = cpu_seconds(b, peer)
    moved = result["end"]["sum_received"]
    out = {f"tcp{streams}_gbps": moved["bits_per_second"] / 1e9}
    if before is not None and after is not None and streams == 1:
        out["tcp1_cpu_ms_per_gb"] = (after - before) * 1000 / (moved["bytes"] / 1e9)
    return out


def iperf_udp(b: Bench, peer: str) -> dict[str, float]:
    host, port = TARGETS[peer]["iperf"]
    rate = UDP_RATE_PPS * 64 * 8
    before = cpu_seconds(b, peer)
    result = iperf(b, "-u", "-c", host, "-p", str(port), "-t", "3", "-l", "64", "-b", str(rate))
    after = cpu_seconds(b, peer)
    s = result["end"]["sum"]
    received = s["packets"] - s["lost_packets"]
    out = {"udp_kpps": received / s["seconds"] / 1000, "udp_loss_pct": s["lost_percent"]}
    if before is not None and after is not None:
        out["udp_cpu_us_per_pkt"] = (after - before) * 1e6 / max(received, 1)
    return out


_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1e6}


def _micros(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    return float(m[1]) * _UNITS[m[2]]


def wrk(b: Bench, peer: str, *, keepalive: bool) -> dict[str, float]:
    host, port = TARGETS[peer]["web"]
    args = ["wrk", "-t1", "-c32", "-d3s", "--latency", f"http://{host}:{port}/"]
    if not keepalive:
        args[1:1] = ["-H", "Connection: close"]
    before = cpu_seconds(b, peer)
    out = b.topo.run("cli", *args, timeout=60)
    after = cpu_seconds(b, peer)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    if not keepalive:
        requests = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
        if before is None or after is None:
            return {"new_conn_per_s": rate}
        return {"new_conn_per_s": rate, "newconn_cpu_us": (after - before) * 1e6 / requests}
    p50 = _micros(re.search(r"\s50%\s+(\S+)", out)[1])  # type: ignore[index]
    p99 = _micros(re.search(r"\s99%\s+(\S+)", out)[1])  # type: ignore[index]
    return {"keepalive_rps": rate, "keepalive_p50_us": p50, "keepalive_p99_us": p99}


def echo_rtt(b: Bench, peer: str, rounds: int = 3000) -> dict[str, float]:
    host, port = TARGETS[peer]["echo"]

    def measure() -> list[float]:
        with socket.create_connection((host, port), timeout=5) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            payload, times = b"x" * 64, []
            for _ in range(rounds):
                t = time.perf_counter_ns()
                s.sendall(payload)
                got = 0
                while got < 64:
                    got += len(s.recv(64 - got))
                times.append((time.perf_counter_ns() - t) / 1000)
            return times

    times = sorted(b.topo.call("cli", measure))
    return {"echo_p50_us": times[len(times) // 2], "echo_p99_us": times[int(len(times) * 0.99)]}


def idle_memory(b: Bench, peer: str) -> dict[str, float]:
    host, port = TARGETS[peer]["echo"]
    pids = b.pids.get(peer)
    if not pids:
        return {}
    before = sum(rss_kib(p) for p in pids)

    def hold() -> list[socket.socket]:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
        socks = []
        for _ in range(IDLE_CONNECTIONS):
            s = socket.create_connection((host, port), timeout=5)
            socks.append(s)
        for s in socks[:: IDLE_CONNECTIONS // 20]:  # the relays are really up
            s.sendall(b"x")
            assert s.recv(1) == b"x"
        return socks

    socks = b.topo.call("cli", hold)
    time.sleep(1.0)
    after = sum(rss_kib(p) for p in pids)
    for s in socks:
        s.close()
    time.sleep(1.0)
    return {"idle_kib_per_conn": (after - before) / IDLE_CONNECTIONS}


WORKLOADS: dict[str, Callable[[Bench, str], dict[str, float]]] = {
    "tcp1": lambda b, p: iperf_tcp(b, p, 1),
    "tcp8": lambda b, p: iperf_tcp(b, p, 8),
    "newconn": lambda b, p: wrk(b, p, keepalive=False),
    "keepalive": lambda b, p: wrk(b, p, keepalive=True),
    "echo": echo_rtt,
    "udp": iperf_udp,
}


# ----------------------------------------------------------------------------- control plane
#: Control-plane runs: key prefix -> the portals backend.
PORTAL_BACKENDS = {"": "iptables", "nft_": "nftables"}


async def control_plane(work: Path, sizes: list[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for size in sizes:
        for prefix, backend in PORTAL_BACKENDS.items():
            out.update(await control_plane_run(work, size, prefix, backend))
    return out


async def control_plane_run(work: Path, size: int, prefix: str, backend: str) -> dict[str, float]:
    """A cold start on `size` service ports from a fake API server, portals on `backend`."""
    out: dict[str, float] = {}
    topo = Topology(f"upb{os.getpid() % 100000}c{size}{prefix}")
    name = topo.ns["node"]
    await asyncio.to_thread(subprocess.run, ["ip", "netns", "add", name], check=True)
    topo.run("node", "ip", "link", "set", "lo", "up")
    fake = FakeKube(history=4 * size)
    try:
        sock = topo.call("node", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        sock.bind(("127.0.0.1", 0))
        await fake.start(sock=sock)
        for i in range(size):
            ip = f"10.{100 + i // 65000}.{i // 250 % 256}.{i % 250 + 1}"
            fake.apply(service(f"s{i}", cluster_ip=ip, ports=[("http", 80)]))
            fake.apply(endpoint_slice(f"s{i}", addresses=["10.0.2.2"], ports=[("http", 80)]))
        profile = os.environ.get("USERPROXY_PROFILE")  # cProfile output, as for the peers
        wrap = ["-m", "cProfile", "-o", f"{profile}.{prefix}{size}"] if profile else []
        proc = topo.spawn(
            "node", sys.executable, *wrap, "-m", "userproxy", "run",
            "--kubeconfig", str(fake.kubeconfig(work / f"kc{size}")),
            "--iptables-backend", "nft", "--portals-backend", backend, "--log-format", "json",
            "--healthz-bind-address", "", "--metrics-bind-address", "",
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            took, running = await asyncio.to_thread(wait_running, proc, 300)
            out[f"{prefix}ports{size}_s"] = running["first_sync_seconds"]
            out[f"{prefix}ports{size}_cold_s"] = took
            out[f"{prefix}ports{size}_rss_mib"] = rss_kib(proc.pid) / 1024
            if backend == "nftables":
                table = ("ip", "userproxy-portals", "portals")
                portals = topo.run("node", "nft", "list", "map", *table).count(" : ")
            else:
                nat = topo.run("node", "iptables-nft-save", "-t", "nat")
                portals = nat.count("\n-A KUBE-PORTALS-") // 2
            assert portals >= size, f"only {portals} portals for {size} ports ({backend})"
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        await fake.stop()
        await asyncio.to_thread(subprocess.run, ["ip", "netns", "del", name], check=False)
    return out


async def endpoint_change_delay(b: Bench, repeats: int = 5) -> dict[str, float]:
    """Move the web service's only endpoint between backends through the API; the time until
    a new connection reaches the new one."""
    host, port = TARGETS["userproxy"]["web"]

    def get() -> str:
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return data.decode().rsplit("\n", 2)[-2].strip()

    def first_answer_from(name: str, deadline: float) -> float:
        while time.monotonic() < deadline:
            if get() == name:
                return time.monotonic()
        raise RuntimeError(f"{name} never answered")

    delays = []
    for i in range(repeats + 1):
        target = "be1" if i % 2 else "be2"
        started = time.monotonic()
        b.fake.apply(endpoint_slice("web", addresses=[BACKENDS[target]], ports=[("http", WEB)]))
        probe = functools.partial(first_answer_from, target, started + 5)
        seen = await asyncio.to_thread(b.topo.call, "cli", probe)
        if i:  # the first move also warms the path up
            delays.append((seen - started) * 1000)
    b.fake.apply(endpoint_slice("web", addresses=list(BACKENDS.values()), ports=[("http", WEB)]))
    return {"endpoint_change_ms": statistics.median(delays)}


class RestartLoad:
    """From the client namespace: new HTTP connections through the web VIP one after another
    (each answer checked), and long-lived echo connections, while userproxy restarts."""

    def __init__(self, b: Bench, streams: int = 5) -> None:
        self.b = b
        self.attempts = self.failures = 0
        self.stop = threading.Event()
        self.streams = [b.topo.call("cli", self._open_stream) for _ in range(streams)]
        self.thread = threading.Thread(target=lambda: b.topo.call("cli", self._loop), daemon=True)
        self.thread.start()

    @staticmethod
    def _open_stream() -> socket.socket:
        return socket.create_connection(TARGETS["userproxy"]["echo"], timeout=3)

    def _loop(self) -> None:
        deadline = time.monotonic() + 120  # bounded whatever happens
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.attempts += 1
            try:
                with socket.create_connection(TARGETS["userproxy"]["web"], timeout=3) as s:
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    data = b""
                    while chunk := s.recv(4096):
                        data += chunk
                ok = data.startswith(b"HTTP/1.1 200") and data.rstrip().endswith((b"be1", b"be2"))
            except OSError:
                ok = False
            self.failures += not ok

    def streams_alive(self) -> int:
        alive = 0
        for i, s in enumerate(self.streams):
            payload = i.to_bytes(4, "big") + os.urandom(60)
            try:
                s.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    chunk = s.recv(len(payload) - len(got))
                    if not chunk:
                        break
                    got += chunk
                alive += got == payload
            except OSError:
                pass
        return alive

    def finish(self) -> tuple[int, int]:
        self.stop.set()
        self.thread.join(10)
        for s in self.streams:
            s.close()
        return self.attempts, self.failures


async def restarts(b: Bench, running: subprocess.Popen[bytes]) -> tuple[dict[str, float], Any]:
    """A hand-over (a second `userproxy run` takes over the running one) and a crash restart
    (SIGKILL, then a new process) under steady new-connection load. Returns the figures and
    the process left running."""
    load = RestartLoad(b)
    await asyncio.sleep(1)
    successor = await b.start_userproxy()
    await asyncio.sleep(1)
    alive = load.streams_alive()
    attempts, failures = load.finish()  # closing the streams lets the old process finish
    await asyncio.to_thread(running.wait, 30)
    out = {"handover_attempts": attempts, "handover_failures": failures,
           "handover_streams_lost": len(load.streams) - alive}  # fmt: skip
    load = RestartLoad(b, streams=0)
    await asyncio.sleep(1)
    successor.kill()
    await asyncio.to_thread(successor.wait, 10)
    killed = time.monotonic()
    restarted = await b.start_userproxy()
    out["crash_restart_serving_s"] = time.monotonic() - killed
    before = load.failures
    await asyncio.sleep(5)
    attempts, failures = load.finish()
    out["crash_failures_after_recovery"] = failures - before
    return out, restarted


# ----------------------------------------------------------------------------- report
METRICS = [  # key, header, format, higher is better
    ("tcp1_gbps", "TCP 1 stream Gbit/s", "{:.1f}", True),
    ("tcp8_gbps", "TCP 8 streams Gbit/s", "{:.1f}", True),
    ("tcp1_cpu_ms_per_gb", "proxy CPU ms/GB (1 stream)", "{:.0f}", False),
    ("new_conn_per_s", "new conn/s", "{:,.0f}", True),
    ("newconn_cpu_us", "proxy CPU us/new conn", "{:.0f}", False),
    ("keepalive_rps", "keep-alive req/s", "{:,.0f}", True),
    ("keepalive_p50_us", "keep-alive p50 us", "{:.0f}", False),
    ("keepalive_p99_us", "keep-alive p99 us", "{:.0f}", False),
    ("echo_p50_us", "64 B echo RTT p50 us", "{:.0f}", False),
    ("udp_kpps", f"UDP kpps ({UDP_RATE_PPS // 1000} offered)", "{:.0f}", True),
    ("udp_loss_pct", "UDP loss %", "{:.1f}", False),
    ("udp_cpu_us_per_pkt", "proxy CPU us/datagram", "{:.1f}", False),
    ("idle_kib_per_conn", "idle KiB/conn", "{:.2f}", False),
]


def report(medians: dict[str, dict[str, float]], control: dict[str, float], rounds: int) -> str:
    lines = [f"Medians of {rounds} interleaved rounds, one run, this machine "
             f"({os.cpu_count()} cores). Every proxy runs one thread/process except "
             f"`{TWO_WORKERS}`. The last three rows are measured after the interleaved rounds, "
             "in the same run (userproxy instances cannot run side by side).", ""]  # fmt: skip
    lines.append("| peer | " + " | ".join(h for _, h, _, _ in METRICS) + " |")
    lines.append("|---|" + "---:|" * len(METRICS))
    for peer in ALL_PEERS:
        cells = []
        for key, _, fmt, _ in METRICS:
            value = medians[peer].get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append(f"| {peer} | " + " | ".join(cells) + " |")
    up, none = medians["userproxy"], medians["none"]
    best_haproxy = {
        key: (max if better else min)(
            medians[p][key] for p in ("haproxy", "haproxy-tuned") if key in medians[p]
        )
        for key, _, _, better in METRICS
        if all(key in medians[p] for p in ("haproxy", "haproxy-tuned"))
    }
    lines += ["", "userproxy against its targets (ratios from this run):", "",
              "| target | measured | met |", "|---|---:|:---:|"]  # fmt: skip

    def row(name: str, value: float, ok: bool | None, fmt: str = "{:.2f}x") -> None:
        met = "-" if ok is None else "yes" if ok else "no"  # None: no target, for context
        lines.append(f"| {name} | {fmt.format(value)} | {met} |")

    def have(*pairs: tuple[dict[str, float], str]) -> bool:
        return all(key in where for where, key in pairs)

    if have((up, "tcp1_gbps"), (none, "tcp1_gbps")):
        tcp = up["tcp1_gbps"] / none["tcp1_gbps"]
        row("TCP bulk 1 stream >= 0.8x no proxy", tcp, tcp >= 0.8)
    for key, label in (("new_conn_per_s", "new conn/s"), ("keepalive_rps", "keep-alive req/s")):
        if have((up, key), (best_haproxy, key)):
            ratio = up[key] / best_haproxy[key]
            row(f"{label} >= better HAProxy", ratio, ratio >= 1)
    if have((up, "echo_p50_us"), (best_haproxy, "echo_p50_us")):
        rtt = best_haproxy["echo_p50_us"] / up["echo_p50_us"]
        row("echo RTT <= better HAProxy (their RTT / ours)", rtt, rtt >= 1)
    if have((up, "udp_kpps"), (none, "udp_kpps")):
        udp = up["udp_kpps"] / none["udp_kpps"]
        row("UDP pps >= 0.8x no proxy", udp, udp >= 0.8)
    if "idle_kib_per_conn" in up:
        row("<= 2.5 KiB per idle connection", up["idle_kib_per_conn"],
            up["idle_kib_per_conn"] <= 2.5, "{:.2f} KiB")  # fmt: skip
    for size in (1000, 10000):
        for prefix, what, target in (("", "iptables", 2.0), ("nft_", "nftables", 0.5)):
            if f"{prefix}ports{size}_s" not in control:
                continue
            first = control[f"{prefix}ports{size}_s"]
            row(f"{size:,} service ports programmed, {what} portals (first sync: listeners + "
                f"rules, target {target} s at 10,000)", first,
                first <= target if size == 10000 else None, "{:.2f} s")  # fmt: skip
            row(f"{size:,} service ports, {what} portals, cold start (process start, LIST, "
                "first sync)", control[f"{prefix}ports{size}_cold_s"], None,
                "{:.2f} s")  # fmt: skip
            rss = control[f"{prefix}ports{size}_rss_mib"]
            row(f"{size:,} service ports RSS, {what} portals", rss, rss <= 300,
                "{:.0f} MiB")  # fmt: skip
    nft, dnat = medians.get(NFTABLES_MODE, {}), medians.get("kernel DNAT", {})
    for key, label in (("new_conn_per_s", "new conn/s"), ("keepalive_rps", "keep-alive req/s")):
        if have((nft, key), (dnat, key)):
            ratio = nft[key] / dnat[key]
            row(f"nftables mode {label} within 5% of kernel DNAT", ratio, ratio >= 0.95)
    if "handover_attempts" in control:
        row(f"hand-over under load: failed of {control['handover_attempts']:.0f} new "
            "connections (target 0)", control["handover_failures"],
            control["handover_failures"] == 0, "{:.0f}")  # fmt: skip
        row("hand-over: established connections lost (target 0 of 5)",
            control["handover_streams_lost"], control["handover_streams_lost"] == 0,
            "{:.0f}")  # fmt: skip
        row("crash restart (SIGKILL): serving again after", control["crash_restart_serving_s"],
            None, "{:.2f} s")  # fmt: skip
        row("crash restart: failed connections once serving again (target 0)",
            control["crash_failures_after_recovery"],
            control["crash_failures_after_recovery"] == 0, "{:.0f}")  # fmt: skip
    if "endpoint_change_ms" in control:
        row("endpoint change -> new connections <= 50 ms", control["endpoint_change_ms"],
            control["endpoint_change_ms"] <= 50, "{:.1f} ms")  # fmt: skip
    return "\n".join(lines) + "\n"


def chart(medians: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("tcp1_gbps", True), ("tcp8_gbps", True), ("new_conn_per_s", True),
            ("keepalive_rps", True), ("echo_p50_us", False), ("udp_kpps", True)]  # fmt: skip
    labels = ["TCP 1", "TCP 8", "new conn/s", "keep-alive", "echo (1/RTT)", "UDP pps"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(ALL_PEERS)
    for i, peer in enumerate(ALL_PEERS):
        values = []
        for key, higher in keys:
            v, base = medians[peer].get(key), medians["none"].get(key)
            values.append(0 if v is None or base is None else (v / base if higher else base / v))
        ax.bar([x + i * width for x in range(len(keys))], values, width, label=peer)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))], labels)
    ax.set_ylabel("relative to no proxy (higher is better)")
    ax.legend(ncol=6, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 1.12))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- main
async def main(args: argparse.Namespace) -> None:
    results: Path = args.results
    started = time.monotonic()
    samples: dict[str, dict[str, list[float]]] = {p: {} for p in ALL_PEERS}
    control: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="userproxy-bench-") as tmp:
        work = Path(tmp)
        topo = Topology().create()
        bench = Bench(topo, work)
        try:
            bench.start_backends()
            bench.start_dnat()
            bench.start_haproxy()
            await bench.start_api()
            userspace = await bench.start_userproxy()
            workloads = {k: v for k, v in WORKLOADS.items() if k in args.workloads}
            for r in range(args.rounds):
                for w, (name, workload) in enumerate(workloads.items()):
                    peers = [p for p in (UDP_PEERS if name == "udp" else PEERS) if p in args.peers]
                    shift = (r + w) % len(peers)
                    for peer in peers[shift:] + peers[:shift]:
                        bench.fresh_conntrack()
                        result = await asyncio.to_thread(workload, bench, peer)
                        for key, value in result.items():
                            samples[peer].setdefault(key, []).append(value)
                print(f"round {r + 1}/{args.rounds} done at {time.monotonic() - started:.0f}s",
                      flush=True)  # fmt: skip
            for peer in [p for p in ("haproxy", "haproxy-tuned", "userproxy") if p in args.peers]:
                if "idle" not in args.workloads:
                    break
                for key, value in (await asyncio.to_thread(idle_memory, bench, peer)).items():
                    samples[peer].setdefault(key, []).append(value)
            if args.ports:
                control.update(await endpoint_change_delay(bench))
            running = userspace
            if args.restart:
                figures, running = await restarts(bench, running)
                control.update(figures)
                print(f"restarts done at {time.monotonic() - started:.0f}s", flush=True)
            for peer, extra in [(p, e) for p, e in AFTER_ROUNDS.items() if p in args.peers]:
                running.terminate()
                await asyncio.to_thread(running.wait, 30)
                running = await bench.start_userproxy(extra, peer)
                for _ in range(args.rounds):
                    for workload in workloads.values():
                        bench.fresh_conntrack()
                        result = await asyncio.to_thread(workload, bench, peer)
                        for key, value in result.items():
                            samples[peer].setdefault(key, []).append(value)
                print(f"{peer} done at {time.monotonic() - started:.0f}s", flush=True)
        finally:
            bench.stop()
            await bench.fake.stop()
            topo.destroy()
        if args.ports:
            control.update(await control_plane(work, [int(s) for s in args.ports.split(",")]))
    medians = {p: {k: statistics.median(v) for k, v in m.items()} for p, m in samples.items()}
    text = report(medians, control, args.rounds)
    text += (
        "\nControl plane (userproxy; nft_ = nftables portals, else iptables-nft portals): "
        + ", ".join(f"{k} = {v:.2f}" for k, v in control.items())
        + f"\n\nTotal benchmark time: {time.monotonic() - started:.0f} s.\n"
    )
    (results / "results.md").write_text(text)
    (results / "results.json").write_text(
        json.dumps({"medians": medians, "samples": samples, "control": control}, indent=2)
    )
    chart(medians, results / "chart.png")
    print(text)


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench/run.py needs root (it builds network namespaces)")
    parser = argparse.ArgumentParser(description="userproxy beside its peers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--ports", default="1000,10000", help="control-plane sizes ('' skips the control plane)"
    )
    parser.add_argument(
        "--restart",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure a hand-over and a crash restart under load",
    )
    parser.add_argument(
        "--workloads",
        type=lambda s: s.split(","),
        default=[*WORKLOADS, "idle"],
        help=f"a subset of {','.join([*WORKLOADS, 'idle'])}",
    )
    parser.add_argument(
        "--peers",
        type=lambda s: s.split(","),
        default=ALL_PEERS,
        help=f"a subset of {','.join(ALL_PEERS)}",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="where results go (a focused run should not overwrite the full one)",
    )
    arguments = parser.parse_args()
    arguments.results.mkdir(parents=True, exist_ok=True)
    asyncio.run(main(arguments))
