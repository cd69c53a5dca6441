"""The node's own addresses, read from /proc (no subprocess, no netlink library): IPv4 from
the LOCAL entries of /proc/net/fib_trie, IPv6 from /proc/net/if_inet6."""

from __future__ import annotations

import ipaddress
from pathlib import Path


def parse_fib_trie(text: str) -> set[str]:
    """Addresses the kernel routes as `host LOCAL` (the node's IPv4 addresses)."""
    out: set[str] = set()
    last = ""
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "|--":
            last = words[1]
        elif words[-2:] == ["host", "LOCAL"] and words[0] == "/32":
            out.add(last)
    return out


def parse_if_inet6(text: str) -> set[str]:
    out: set[str] = set()
    for line in text.splitlines():
        words = line.split()
        if words and len(words[0]) == 32:
            out.add(str(ipaddress.IPv6Address(bytes.fromhex(words[0]))))
    return out


def local_addresses(proc: Path = Path("/proc/net")) -> frozenset[str]:
    found: set[str] = set()
    for name, parse in (("fib_trie", parse_fib_trie), ("if_inet6", parse_if_inet6)):
        try:
            found |= parse((proc / name).read_text())
        except OSError:
            continue
    return frozenset(found)
