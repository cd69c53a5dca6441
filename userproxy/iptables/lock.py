"""The xtables lock: every iptables binary takes flock(LOCK_EX) on /run/xtables.lock (shared
with the host through a hostPath in a DaemonSet). libiptc takes none, so python-iptables
writers hold it themselves."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

from userproxy.iptables.interface import RulesError

XTABLES_LOCK = "/run/xtables.lock"


@contextlib.contextmanager
def xtables_lock(path: str = XTABLES_LOCK, timeout: float = 5.0) -> Iterator[None]:
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RulesError(f"another process held {path} for {timeout:.0f}s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock
