"""Port allocator: kube-proxy's port_allocator_test.go cases plus parsing and properties."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from userproxy.ports import (
    EPHEMERAL_DEFAULT,
    PortRange,
    PortsExhausted,
    RangePortAllocator,
    ephemeral_range,
    make_allocator,
    parse_port_range,
)


@pytest.mark.parametrize("text", ["", "0", "0-0", None, "  "])
def test_empty_ranges_mean_the_kernels_ephemeral_range(text: str | None, tmp_path: Path) -> None:
    assert parse_port_range(text) is None
    allocator = make_allocator(None)
    assert isinstance(allocator, RangePortAllocator)
    assert allocator.range == ephemeral_range()
    first, second = allocator.allocate(), allocator.allocate()
    assert first != second and first in allocator.range and second in allocator.range
    sysctl = tmp_path / "ip_local_port_range"
    sysctl.write_text("40000\t40999\n")
    assert ephemeral_range(str(sysctl)) == PortRange(40000, 1000)
    assert ephemeral_range(str(tmp_path / "missing")) == EPHEMERAL_DEFAULT


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30000-30009", PortRange(30000, 10)),
        ("8080", PortRange(8080, 1)),
        ("40000+99", PortRange(40000, 100)),
        ("1-65535", PortRange(1, 65535)),
    ],
)
def test_range_forms(text: str, expected: PortRange) -> None:
    assert parse_port_range(text) == expected


@pytest.mark.parametrize("text", ["a-b", "10-5", "70000", "0-10", "5+-1", "1-2-3"])
def test_bad_ranges_are_refused_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match="invalid port range"):
        parse_port_range(text)


def test_empty_range_cannot_build_an_allocator() -> None:
    with pytest.raises(ValueError):
        RangePortAllocator(PortRange(1, 0))


def test_fully_allocated_range() -> None:
    allocator = RangePortAllocator(PortRange(1, 1))
    assert allocator.allocate() == 1
    with pytest.raises(PortsExhausted, match="1-1 is in use"):
        allocator.allocate()
    allocator.release(1)
    assert allocator.allocate() == 1
    with pytest.raises(PortsExhausted):
        allocator.allocate()


def test_randomish_allocation_and_release() -> None:
    allocator = RangePortAllocator(PortRange(1, 100), rng=random.Random(1))
    first = [allocator.allocate() for _ in range(100)]
    assert sorted(first) == list(range(1, 101))
    assert all(allocator.in_use(p) for p in first)
    for port in first:
        allocator.release(port)
    assert allocator.free == 100 and not any(allocator.in_use(p) for p in first)
    second = [allocator.allocate() for _ in range(100)]
    assert sorted(second) == list(range(1, 101))
    assert first != second  # "somewhat random order"


def test_release_outside_the_range_or_twice_is_ignored() -> None:
    allocator = RangePortAllocator(PortRange(10, 2))
    port = allocator.allocate()
    allocator.release(9999)
    allocator.release(port)
    allocator.release(port)
    assert allocator.free == 2


@given(ops=st.lists(st.booleans(), max_size=200), size=st.integers(1, 20), seed=st.integers())
def test_never_hands_out_a_port_twice(ops: list[bool], size: int, seed: int) -> None:
    allocator = RangePortAllocator(PortRange(5000, size), rng=random.Random(seed))
    held: set[int] = set()
    rng = random.Random(seed)
    for allocate in ops:
        if allocate:
            if len(held) == size:
                with pytest.raises(PortsExhausted):
                    allocator.allocate()
                continue
            port = allocator.allocate()
            assert port not in held and port in allocator.range
            held.add(port)
        elif held:
            port = rng.choice(sorted(held))
            allocator.release(port)
            held.discard(port)
    assert allocator.free == size - len(held)
