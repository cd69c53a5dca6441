"""Per-endpoint traffic counters, summed per service port on demand.

The hot path touches exactly one small object per chunk (the endpoint's counters), so the
relay pays one attribute increment per read; the service-port totals are derived when asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from userproxy.model import Endpoint
from userproxy.provider import CountersSnapshot


class EndpointCounters:
    __slots__ = ("active", "bytes_from_clients", "bytes_to_clients", "dial_failures", "total")

    def __init__(self) -> None:
        self.active = 0
        self.total = 0
        #: client -> endpoint
        self.bytes_from_clients = 0
        #: endpoint -> client
        self.bytes_to_clients = 0
        self.dial_failures = 0


def snapshot(c: EndpointCounters) -> CountersSnapshot:
    return CountersSnapshot(
        c.active, c.total, c.bytes_from_clients, c.bytes_to_clients, c.dial_failures
    )


@dataclass
class PortStats:
    """Counters of one service port, kept across listener rebuilds for as long as it exists.

    For UDP, `active`/`total` count client flows instead of connections.
    """

    endpoints: dict[Endpoint, EndpointCounters] = field(default_factory=dict)
    #: Connections or datagrams turned away because the service port had no endpoints.
    rejected: int = 0

    def endpoint(self, endpoint: Endpoint) -> EndpointCounters:
        counters = self.endpoints.get(endpoint)
        if counters is None:
            counters = self.endpoints[endpoint] = EndpointCounters()
        return counters
