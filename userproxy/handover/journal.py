"""The proxy ports of the running process, kept in a file beside the instance lock, so that
a process started after a crash binds the same ports again: the portal rules the dead one
left are right again the moment the new one listens, instead of after its first rule write.

The file is replaced atomically (write, fsync-free rename: it lives on tmpfs) only when the
ports changed; a missing, unreadable or foreign file just means a cold start."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import structlog

log = structlog.get_logger("userproxy.handover")

VERSION = 1


class PortJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._last: dict[str, int] | None = None

    def load(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("Ignoring an unreadable proxy-port journal.", path=str(self.path),
                        reason=str(err))  # fmt: skip
            return {}
        ports = (
            data.get("ports") if isinstance(data, dict) and data.get("version") == VERSION else None
        )
        if not isinstance(ports, dict):
            return {}
        return {k: v for k, v in ports.items() if isinstance(k, str) and _is_port(v)}

    def save(self, ports: dict[str, int]) -> None:
        if ports == self._last:
            return
        temporary = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps({"version": VERSION, "ports": ports}))
            temporary.replace(self.path)
        except OSError as err:
            with contextlib.suppress(OSError):
                temporary.unlink()
            log.warning("Could not record the proxy ports; a restart after a crash will pick "
                        "new ones.", path=str(self.path), reason=str(err))  # fmt: skip
            return
        self._last = dict(ports)


def _is_port(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536
