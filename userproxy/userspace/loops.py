"""Proxy loops: an endpoint that leads back into this proxy. Pure.

An EndpointSlice can name the proxy itself: a local address and one of the proxy ports, a
ClusterIP / externalIP / LoadBalancer IP and port that the portals redirect to the proxy, or a
NodePort on a node address. Every connection would then dial the proxy again, each hop holding
two more descriptors, until none are left. Such endpoints are refused, with the object named.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field

from userproxy.model import Endpoint


@dataclass
class OwnAddresses:
    """Where this proxy answers. The containers may be live views the owner keeps current
    (a check must not cost a pass over every service port)."""

    #: The node's addresses.
    local: Container[str] = frozenset()
    #: The address the proxy ports listen on; None means every local address.
    bind_address: str | None = None
    proxy_ports: Container[int] = field(default_factory=frozenset)
    #: (address, port) pairs the portals send to the proxy (empty without portals).
    service_addresses: Container[tuple[str, int]] = field(default_factory=frozenset)
    #: NodePorts the portals send to the proxy (empty without portals).
    node_ports: Container[int] = field(default_factory=frozenset)

    def loop(self, endpoint: Endpoint) -> str | None:
        """Why `endpoint` leads back into this proxy, or None."""
        ip, port = endpoint.ip, endpoint.port
        here = ip == self.bind_address if self.bind_address is not None else ip in self.local
        if here and port in self.proxy_ports:
            return f"endpoint {endpoint} is one of this proxy's own ports (a loop)"
        if (ip, port) in self.service_addresses:
            return f"endpoint {endpoint} is a service address this proxy serves (a loop)"
        if ip in self.local and port in self.node_ports:
            return f"endpoint {endpoint} is a NodePort of this node (a loop)"
        return None
