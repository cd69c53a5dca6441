"""Proxy-port allocation (`--proxy-port-range`). Pure, but for reading the kernel's range.

An empty range, "0" or "0-0" means ports from the kernel's ephemeral range
(net.ipv4.ip_local_port_range), picked here rather than by binding port 0: the kernel's
search for a free port on bind(0) grows with the number of ports in use (0.3 ms each at
10,000 listeners, 3 s in all), while binding a chosen port is a hash lookup. A port someone
else holds just fails to bind and the proxier tries another. A range (`begin-end`, a single
`port`, or `begin+offset`, all inclusive as in kube-proxy) hands out ports from a bitmap,
starting each search at a random offset so that a restarted proxy does not reuse the
previous run's ports in the same order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol


class PortsExhausted(RuntimeError):
    def __init__(self, port_range: PortRange) -> None:
        super().__init__(
            f"port allocation failed: every port of the proxy port range {port_range} is in use"
        )


@dataclass(frozen=True, slots=True)
class PortRange:
    begin: int
    size: int

    @property
    def end(self) -> int:
        return self.begin + self.size - 1

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.begin <= port <= self.end

    def __str__(self) -> str:
        return f"{self.begin}-{self.end}"


def parse_port_range(text: str | None) -> PortRange | None:
    """Parse `--proxy-port-range`; None means kernel-chosen ports."""
    text = (text or "").strip()
    if text in ("", "0", "0-0"):
        return None
    try:
        if "-" in text:
            low_text, high_text = text.split("-", 1)
            low, high = int(low_text), int(high_text)
        elif "+" in text:
            low_text, offset_text = text.split("+", 1)
            low, offset = int(low_text), int(offset_text)
            if offset < 0:
                raise ValueError
            high = low + offset
        else:
            low = high = int(text)
    except ValueError:
        raise ValueError(
            f"invalid port range {text!r}: use begin-end, a single port, or begin+offset"
        ) from None
    if not 1 <= low <= high <= 65535:
        raise ValueError(
            f"invalid port range {text!r}: ports must satisfy 1 <= begin <= end <= 65535"
        )
    return PortRange(low, high - low + 1)


class PortAllocator(Protocol):
    def allocate(self) -> int:
        """A free port. Raises PortsExhausted."""

    def release(self, port: int) -> None: ...

    def claim(self, port: int) -> bool:
        """Mark a given port as used (one inherited from a predecessor). False if it already
        is; a port outside the range is not tracked and always granted."""


class RangePortAllocator:
    def __init__(self, port_range: PortRange, *, rng: random.Random | None = None) -> None:
        if port_range.size <= 0:
            raise ValueError("a port range must hold at least one port")
        self.range = port_range
        self._used = bytearray(port_range.size)
        self._free = port_range.size
        self._rng = rng or random.Random()

    def allocate(self) -> int:
        if self._free == 0:
            raise PortsExhausted(self.range)
        size = self.range.size
        start = self._rng.randrange(size)
        for step in range(size):
            offset = (start + step) % size
            if not self._used[offset]:
                self._used[offset] = 1
                self._free -= 1
                return self.range.begin + offset
        raise AssertionError("free count and bitmap disagree")  # pragma: no cover

    def release(self, port: int) -> None:
        if port in self.range and self._used[port - self.range.begin]:
            self._used[port - self.range.begin] = 0
            self._free += 1

    def claim(self, port: int) -> bool:
        if port not in self.range:
            return True
        if self._used[port - self.range.begin]:
            return False
        self._used[port - self.range.begin] = 1
        self._free -= 1
        return True

    def in_use(self, port: int) -> bool:
        return port in self.range and bool(self._used[port - self.range.begin])

    @property
    def free(self) -> int:
        return self._free


EPHEMERAL_DEFAULT = PortRange(32768, 60999 - 32768 + 1)


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> PortRange:
    try:
        with open(path) as f:
            low, high = (int(x) for x in f.read().split())
        return PortRange(low, high - low + 1)
    except (OSError, ValueError):
        return EPHEMERAL_DEFAULT


def make_allocator(port_range: PortRange | None) -> PortAllocator:
    return RangePortAllocator(port_range or ephemeral_range())
