"""A sealed test network: a node with a bridge, two pods and an external client, all in
network namespaces this test creates, none linked to the root namespace.

 ext 192.168.50.2 --veth-- eth0 192.168.50.1 (node IP)         node
                           cbr0 10.244.0.1/24, default via 192.168.50.2
 pod1 10.244.0.2 --veth0--+
 pod2 10.244.0.3 --veth1--+
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import socket
import subprocess
from collections.abc import Iterator

NODE_IP, EXT_IP, POD_GW = "192.168.50.1", "192.168.50.2", "10.244.0.1"
POD_IPS = {"pod1": "10.244.0.2", "pod2": "10.244.0.3"}
# IPv6 beside it (nodad: usable at once): the same shape in fd00:50::/64 and fd00:244::/64.
NODE_IP6, EXT_IP6, POD_GW6 = "fd00:50::1", "fd00:50::2", "fd00:244::1"
POD_IPS6 = {"pod1": "fd00:244::2", "pod2": "fd00:244::3"}
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_seq = itertools.count()


def create() -> dict[str, str]:
    prefix = f"upt{os.getpid() % 100000}-{next(_seq)}"
    ns = {k: f"{prefix}-{k}" for k in ("node", "pod1", "pod2", "ext")}
    node = [
        "link set lo up",
        "link add cbr0 type bridge",
        f"addr add {POD_GW}/24 dev cbr0",
        "link set cbr0 up",
        f"link add eth0 type veth peer name eth0 netns {ns['ext']}",
        f"addr add {NODE_IP}/24 dev eth0",
        f"addr add {POD_GW6}/64 dev cbr0 nodad",
        f"addr add {NODE_IP6}/64 dev eth0 nodad",
        "link set eth0 up",
        # Host-originated VIP traffic needs a route before OUTPUT nat can rewrite it.
        f"route add default via {EXT_IP}",
        f"route add default via {EXT_IP6}",
    ]
    groups: list[tuple[str | None, list[str]]] = [(None, [f"netns add {n}" for n in ns.values()])]
    for i, (pod, ip) in enumerate(POD_IPS.items()):
        node += [
            f"link add veth{i} type veth peer name eth0 netns {ns[pod]}",
            f"link set veth{i} master cbr0",
            # kubelet's hairpin-veth: a pod reaching itself through a service VIP needs the
            # bridge to send the DNATed frame back out of the port it came in on.
            f"link set veth{i} type bridge_slave hairpin on",
            f"link set veth{i} up",
        ]
        groups.append(
            (
                ns[pod],
                [
                    "link set lo up",
                    f"addr add {ip}/24 dev eth0",
                    f"addr add {POD_IPS6[pod]}/64 dev eth0 nodad",
                    "link set eth0 up",
                    f"route add default via {POD_GW}",
                    f"route add default via {POD_GW6}",
                ],
            )
        )
    groups.insert(1, (ns["node"], node))
    groups.append(
        (
            ns["ext"],
            [
                "link set lo up",
                f"addr add {EXT_IP}/24 dev eth0",
                f"addr add {EXT_IP6}/64 dev eth0 nodad",
                "link set eth0 up",
            ],
        )
    )
    try:
        for netns, lines in groups:
            cmd = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
            subprocess.run(cmd, input="\n".join(lines) + "\n", text=True, check=True)
        # A Kubernetes node routes for its pods (iptables mode DNATs pod traffic onwards).
        run_in(ns["node"], "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        run_in(ns["node"], "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
    except Exception:
        destroy(ns)
        raise
    return ns


def destroy(ns: dict[str, str]) -> None:
    for name in ns.values():
        subprocess.run(["ip", "netns", "del", name], check=False, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def bare(tag: str) -> Iterator[str]:
    """An empty network namespace of this test process's, deleted afterwards."""
    name = f"upt{os.getpid() % 100000}-{tag}{next(_seq)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@contextlib.contextmanager
def inside(name: str) -> Iterator[None]:
    """Switch this thread into a namespace (sockets made here stay there). Never await inside."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(there, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({name})")
        yield
    finally:
        if _libc.setns(here, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back failed")
        os.close(here)
        os.close(there)


def socket_in(
    name: str, kind: int = socket.SOCK_STREAM, family: int = socket.AF_INET
) -> socket.socket:
    with inside(name):
        sock = socket.socket(family, kind)
    sock.setblocking(False)
    return sock


def run_in(name: str, *argv: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", name, *argv], capture_output=True, text=True, check=True
    ).stdout
