"""The node's own addresses, read from /proc (no subprocess, no netlink library): IPv4 from
the LOCAL entries of /proc/net/fib_trie, IPv6 from /proc/net/if_inet6."""

from __future__ import annotations

import ipaddress
import time
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


#: Seconds a reading is reused: the proxier's loop checks and the externalIP policy both look
#: before a sync, and /proc/net/fib_trie lists every route (thousands on a busy node).
FRESH_FOR = 1.0
_last: tuple[float, Path, frozenset[str]] | None = None


def local_addresses(proc: Path = Path("/proc/net")) -> frozenset[str]:
    global _last
    now = time.monotonic()
    if _last is not None and _last[1] == proc and now - _last[0] < FRESH_FOR:
        return _last[2]
    found = _read(proc)
    _last = (now, proc, found)
    return found


def _read(proc: Path) -> frozenset[str]:
    found: set[str] = set()
    for name, parse in (("fib_trie", parse_fib_trie), ("if_inet6", parse_if_inet6)):
        try:
            found |= parse((proc / name).read_text())
        except OSError:
            continue
    return frozenset(found)
