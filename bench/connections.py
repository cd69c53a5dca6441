"""What one new connection costs a proxy: CPU and syscalls, the proxy pinned to one core and
the load (wrk, nginx backends) on the other, so per-commit changes show without the noise of
shared cores.

    sudo python3 bench/connections.py [--rounds 5] [--syscalls] [--peers haproxy,userproxy]
    sudo python3 bench/connections.py --workers-scaling [--clients 8]

The same sealed topology as bench/run.py. Each round runs wrk with `Connection: close` (one
thread, 32 connections, 3 s) against every peer in turn; the figures are medians over the
rounds: new connections per second, the proxy's CPU per connection (user + system time of its
processes over the run), and with `--syscalls` the system calls per connection (strace -c on
the proxy for one extra run: strace slows it, the count per connection is what matters).

`--workers-scaling` measures `userproxy --workers 2` against one process instead, unpinned,
with connections from several client addresses: the client namespace gets `--clients`
addresses and an nftables rule there (in the sealed namespace) gives each new connection the
next one as its source, so the workers' reuseport steering, which picks a process by client
address, spreads them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.netns import Topology  # noqa: E402
from bench.run import TARGETS, Bench, cpu_seconds  # noqa: E402

PEERS = ["haproxy", "haproxy-tuned", "userproxy"]
PROXY_CPU, LOAD_CPUS = "0", "1"


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (nginx's workers, userproxy's)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


def pin(pids: list[int], cpus: str) -> None:
    for pid in [d for p in pids for d in descendants(p)]:
        subprocess.run(["taskset", "-a", "-cp", cpus, str(pid)], capture_output=True, check=False)


def run_wrk(b: Bench, peer: str, *, pinned: bool = True) -> tuple[float, int, str]:
    host, port = TARGETS[peer]["web"]
    argv = ["taskset", "-c", LOAD_CPUS] if pinned else []
    argv += ["wrk", "-H", "Connection: close", "-t1", "-c32", "-d3s", f"http://{host}:{port}/"]
    out = b.topo.run("cli", *argv, timeout=60)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    requests = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    return rate, requests, out


def measure(b: Bench, peer: str, *, pinned: bool = True) -> dict[str, float]:
    before = cpu_seconds(b, peer)
    rate, requests, _ = run_wrk(b, peer, pinned=pinned)
    after = cpu_seconds(b, peer)
    assert before is not None and after is not None
    return {"new_conn_per_s": rate, "cpu_us": (after - before) * 1e6 / requests}


def syscalls(b: Bench, peer: str) -> float:
    """System calls per connection, counted by strace on the proxy's processes."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as out:
        argv = ["strace", "-c", "-f", "-o", out.name]
        for pid in b.pids[peer]:
            argv += ["-p", str(pid)]
        tracer = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        try:
            _, requests, _ = run_wrk(b, peer)
        finally:
            tracer.terminate()
            tracer.wait(30)
        report = out.read()
        total = re.search(r"^100\.00\s+\S+\s+\S+\s+(\d+)", report, re.M)
    if os.environ.get("SHOW_STRACE"):
        print(f"{peer}: {requests} connections\n{report}")
    return int(total[1]) / requests if total else float("nan")


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def many_clients(topo: Topology, count: int) -> None:
    """`count` source addresses for the client, taken in turn by each new connection."""
    addresses = [f"10.0.1.{10 + i}" for i in range(count)]
    topo.batch("cli", [f"addr add {a}/24 dev eth0" for a in addresses])
    choices = ", ".join(f"{i} : {a}" for i, a in enumerate(addresses))
    rules = (
        "add table ip bench\n"
        "add chain ip bench out { type nat hook postrouting priority 100 ; }\n"
        f"add rule ip bench out ip daddr != 10.0.1.0/24 snat to numgen inc mod {count} "
        f"map {{ {choices} }}\n"
    )
    subprocess.run(topo.argv("cli", "nft", "-f", "-"), input=rules, text=True, check=True)


async def workers_scaling(args: argparse.Namespace) -> None:
    rates: dict[str, list[float]] = {"1 process": [], "--workers 2": []}
    busy: dict[str, list[float]] = {k: [] for k in rates}
    with tempfile.TemporaryDirectory(prefix="userproxy-conn-bench-") as tmp:
        topo = Topology().create()
        bench = Bench(topo, Path(tmp))
        try:
            bench.start_backends()
            await bench.start_api()
            many_clients(topo, args.clients)
            for label, extra in (("1 process", []), ("--workers 2", ["--workers", "2"])):
                proxy = await bench.start_userproxy(extra)
                await asyncio.sleep(1.0)  # workers up and fed
                for _ in range(args.rounds):
                    bench.fresh_conntrack()
                    before = machine_busy()
                    got = await asyncio.to_thread(measure, bench, "userproxy", pinned=False)
                    after = machine_busy()
                    rates[label].append(got["new_conn_per_s"])
                    busy[label].append((after[0] - before[0]) / (after[1] - before[1]))
                proxy.terminate()
                await asyncio.to_thread(proxy.wait, 30)
        finally:
            bench.stop()
            await bench.fake.stop()
            topo.destroy()
    one, two = (statistics.median(rates[k]) for k in rates)
    print(f"\nNew connections from {args.clients} client addresses, unpinned, medians of "
          f"{args.rounds} ({os.cpu_count()} cores): one process {one:,.0f}/s, --workers 2 "
          f"{two:,.0f}/s, {two / one:.2f}x. The machine's cores were busy "
          f"{statistics.median(busy['1 process']):.0%} and "
          f"{statistics.median(busy['--workers 2']):.0%} of the time.")  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    if args.workers_scaling:
        await workers_scaling(args)
        return
    with tempfile.TemporaryDirectory(prefix="userproxy-conn-bench-") as tmp:
        topo = Topology().create()
        bench = Bench(topo, Path(tmp))
        try:
            bench.start_backends()
            bench.start_haproxy()
            await bench.start_api()
            await bench.start_userproxy()
            for peer in args.peers:
                pin(bench.pids[peer], PROXY_CPU)
            proxies = {pid for pids in bench.pids.values() for pid in pids}
            pin([p.pid for p in bench.procs if p.pid not in proxies], LOAD_CPUS)
            samples: dict[str, list[dict[str, float]]] = {p: [] for p in args.peers}
            for r in range(args.rounds):
                for peer in args.peers:
                    bench.fresh_conntrack()
                    samples[peer].append(await asyncio.to_thread(measure, bench, peer))
                print(f"round {r + 1}/{args.rounds}", flush=True)
            calls = {}
            if args.syscalls:
                for peer in args.peers:
                    bench.fresh_conntrack()
                    calls[peer] = await asyncio.to_thread(syscalls, bench, peer)
        finally:
            bench.stop()
            await bench.fake.stop()
            topo.destroy()
    print(f"\nProxy pinned to CPU {PROXY_CPU}, load and backends to CPU {LOAD_CPUS}; medians of "
          f"{args.rounds} rounds ({os.cpu_count()} cores).\n")  # fmt: skip
    print("| relay | new conn/s | CPU µs / connection | syscalls / connection |")
    print("|---|---:|---:|---:|")
    for peer in args.peers:
        rate = statistics.median(s["new_conn_per_s"] for s in samples[peer])
        cpu = statistics.median(s["cpu_us"] for s in samples[peer])
        sc = f"{calls[peer]:.1f}" if peer in calls else "-"
        print(f"| {peer} | {rate:,.0f} | {cpu:.1f} | {sc} |")


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench/connections.py needs root (it builds network namespaces)")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--syscalls", action="store_true", help="count syscalls with strace")
    parser.add_argument("--peers", type=lambda s: s.split(","), default=PEERS)
    parser.add_argument(
        "--workers-scaling",
        action="store_true",
        help="--workers 2 against one process, several client addresses",
    )
    parser.add_argument("--clients", type=int, default=8, help="client addresses (scaling)")
    asyncio.run(main(parser.parse_args()))
