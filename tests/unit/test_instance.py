"""The instance lock: a second holder in the same network namespace is refused, naming the
first; releasing lets the next one in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from userproxy.instance import InstanceLock
from userproxy.provider import StartupError


def test_a_second_instance_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    first, second = InstanceLock(tmp_path), InstanceLock(tmp_path)
    first.acquire()
    with pytest.raises(StartupError, match=f"pid {os.getpid()}.*stop it first"):
        second.acquire()
    assert not second.held
    first.release()
    second.acquire()
    assert second.held
    second.release()
