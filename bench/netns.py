"""Sealed network namespaces for the benchmark: a client, a proxy node and two backends, linked
by veth pairs through the node (which routes), none linked to the root namespace.

  cli 10.0.1.2 --- 10.0.1.1 node 10.0.2.1 --- 10.0.2.2 be1
                                 10.0.3.1 --- 10.0.3.2 be2
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tests.netns.topology import inside

T = TypeVar("T")

NODE_CLIENT_SIDE, CLIENT = "10.0.1.1", "10.0.1.2"
BACKENDS = {"be1": "10.0.2.2", "be2": "10.0.3.2"}


class Topology:
    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"upb{os.getpid() % 100000}"
        self.ns = {k: f"{self.prefix}-{k}" for k in ("cli", "node", "be1", "be2")}

    def create(self) -> Topology:
        ns = self.ns
        for name in ns.values():
            subprocess.run(["ip", "netns", "add", name], check=True)
        node = ["link set lo up", f"link add eth-cli type veth peer name eth0 netns {ns['cli']}",
                f"addr add {NODE_CLIENT_SIDE}/24 dev eth-cli", "link set eth-cli up"]  # fmt: skip
        ends = {"cli": (CLIENT, NODE_CLIENT_SIDE)}
        for i, (be, ip) in enumerate(BACKENDS.items(), start=2):
            node += [f"link add eth-{be} type veth peer name eth0 netns {ns[be]}",
                     f"addr add 10.0.{i}.1/24 dev eth-{be}", f"link set eth-{be} up"]  # fmt: skip
            ends[be] = (ip, f"10.0.{i}.1")
        self.batch("node", node)  # the far ends exist once this ran
        for where, (ip, gateway) in ends.items():
            self.batch(where, ["link set lo up", f"addr add {ip}/24 dev eth0",
                               "link set eth0 up", f"route add default via {gateway}"])  # fmt: skip
        self.run("node", "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        # Hundreds of thousands of short connections per run: TIME_WAIT tuples left in the
        # backends collide with new connections a few runs later (the SYN meets TIME_WAIT and
        # is retransmitted after a second), so later measurements collapse. Keep few.
        for where in ns:
            self.run(where, "sysctl", "-q", "-w", "net.ipv4.tcp_max_tw_buckets=1024")
        return self

    def batch(self, where: str, lines: list[str]) -> None:
        subprocess.run(
            ["ip", "-n", self.ns[where], "-batch", "-"],
            input="\n".join(lines) + "\n",
            text=True,
            check=True,
        )

    def destroy(self) -> None:
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "del", name], check=False, stderr=subprocess.DEVNULL)

    def argv(self, where: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[where], *argv]

    def run(self, where: str, *argv: str, timeout: float = 120) -> str:
        return subprocess.run(
            self.argv(where, *argv), capture_output=True, text=True, check=True, timeout=timeout
        ).stdout

    def spawn(self, where: str, *argv: str, **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(where, *argv), **kw)  # type: ignore[call-overload]

    def call(self, where: str, fn: Callable[[], T]) -> T:
        """Run `fn` in a fresh thread switched into the namespace (its sockets live there)."""

        def run() -> T:
            with inside(self.ns[where]):
                return fn()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(run).result()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
