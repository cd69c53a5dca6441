"""The conntrack batch against the kernel: one `conntrack --load-file` removes the UDP entries
of every removed service port, leaves others alone, and is not stopped by lines that match
nothing."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.netns.topology import bare, inside
from userproxy.model import Protocol, ServicePort, ServicePortName
from userproxy.userspace.portals.conntrack import ExecConntrack

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


def entry(netns: str, dst: str, dport: int, sport: int) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, "conntrack", "-I", "-p", "udp", "-s", "10.0.0.1",
         "-d", dst, "--sport", str(sport), "--dport", str(dport), "-r", "10.0.0.2",
         "-q", "10.0.0.1", "--reply-port-src", str(dport), "--reply-port-dst", str(sport),
         "-t", "60"],
        check=True, capture_output=True,
    )  # fmt: skip


def destinations(netns: str) -> list[str]:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "conntrack", "-L", "-p", "udp"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return sorted(word[4:] for line in out.splitlines() for word in line.split()[:6]
                  if word.startswith("dst="))  # fmt: skip


def udp_port(name: str, ip: str) -> ServicePort:
    return ServicePort(ServicePortName("ns", name, "dns", Protocol.UDP), ip, 53)


def test_one_batch_flushes_every_removed_port_and_nothing_else() -> None:
    with bare("c") as netns:
        for i, dst in enumerate(["10.96.0.10", "10.96.0.11", "10.96.0.12"]):
            entry(netns, dst, 53, 1000 + i)
        gone = [udp_port("never", "10.96.9.9"), udp_port("a", "10.96.0.10"),
                udp_port("b", "10.96.0.12")]  # fmt: skip
        with inside(netns):
            ExecConntrack().flush_udp(gone)
        assert destinations(netns) == ["10.96.0.11"]
