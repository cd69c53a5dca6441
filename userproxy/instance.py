"""One instance per node (per network namespace): the rules lock.

A proxy that writes rules (portals, iptables mode) holds an exclusive flock on
`/run/userproxy/netns-<inode>.lock` for its whole life, the file holding its PID. A second
instance about to manage the same chains finds it held and refuses to start, naming the
running one; otherwise the two would rewrite each other's chains, and the one that exits
would delete them under the other. Instances in different network namespaces manage different
chains and do not conflict. The kernel releases the lock when the process ends, however it ends.
In a DaemonSet, mount /run/userproxy from the host so pods of a rollout see each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from userproxy.provider import StartupError

LOCK_DIR = Path("/run/userproxy")


class InstanceBusy(StartupError):
    """Another process holds the lock (a successor may ask it to hand over)."""


def namespace_id() -> int:
    """This process's network namespace, as the inode of its /proc handle."""
    return os.stat("/proc/self/ns/net").st_ino


class InstanceLock:
    def __init__(self, directory: Path = LOCK_DIR) -> None:
        stem = directory / f"netns-{namespace_id()}"
        self.path = stem.with_suffix(".lock")
        #: Where the holder offers its sockets to a successor (`userproxy.handover`).
        self.handover_path = stem.with_suffix(".handover")
        #: Where the holder records its proxy ports, for a restart after a crash.
        self.journal_path = stem.with_suffix(".ports.json")
        self._fd: int | None = None

    @property
    def fd(self) -> int | None:
        return self._fd

    def adopt(self, fd: int) -> None:
        """Hold the lock through a descriptor the previous holder handed over (the same open
        file, so the same flock), and say so in the file."""
        self.release()
        self._fd = fd
        self._write_pid()

    def wait(self, timeout: float, *, interval: float = 0.1) -> bool:
        """Try to take the lock until `timeout` seconds pass (a predecessor is exiting).
        Blocking: call it in a thread."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.acquire()
                return True
            except InstanceBusy:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(interval)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise StartupError naming the instance that holds it."""
        if self._fd is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise StartupError(f"cannot open the instance lock {self.path}: {err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InstanceBusy(
                f"another userproxy (pid {holder}) already manages the rules of this network "
                f"namespace (it holds {self.path}); stop it first"
            ) from None
        self._fd = fd
        self._write_pid()

    def _write_pid(self) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing releases the flock
            self._fd = None
