"""The health verdict kube-proxy's /healthz gives, made truthful. Pure.

Healthy unless an update has been queued (a change arrived, or the first sync is pending) and
not applied within `timeout` (kube-proxy: twice the sync period). A sync that keeps failing
leaves its update queued, so a proxy whose rules cannot be written turns unhealthy too,
which the old userspace mode never reported.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass


@dataclass(frozen=True)
class Health:
    healthy: bool
    last_updated: float | None
    current_time: float

    def body(self, *, node_eligible: bool | None = None) -> dict[str, object]:
        body: dict[str, object] = {
            "lastUpdated": _iso(self.last_updated) if self.last_updated is not None else "",
            "currentTime": _iso(self.current_time),
        }
        if node_eligible is not None:
            body["nodeEligible"] = node_eligible
        return body

    @property
    def code(self) -> int:
        return 200 if self.healthy else 503


def check(
    *, queued_at: float | None, synced_at: float | None, now: float, timeout: float
) -> Health:
    stuck = queued_at is not None and now - queued_at > timeout
    return Health(not stuck, synced_at, now)


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="milliseconds")
