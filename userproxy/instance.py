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
from pathlib import Path

from userproxy.provider import StartupError

LOCK_DIR = Path("/run/userproxy")


def namespace_id() -> int:
    """This process's network namespace, as the inode of its /proc handle."""
    return os.stat("/proc/self/ns/net").st_ino


class InstanceLock:
    def __init__(self, directory: Path = LOCK_DIR) -> None:
        self.path = directory / f"netns-{namespace_id()}.lock"
        self._fd: int | None = None

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
            raise StartupError(
                f"another userproxy (pid {holder}) already manages the rules of this network "
                f"namespace (it holds {self.path}); stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing releases the flock
            self._fd = None
