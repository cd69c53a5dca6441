"""The contract between the userspace proxier and its portals (pure: model types only)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from userproxy.model import ServicePort, ServicePortName
from userproxy.userspace.portals.rules import PortalPort


@dataclass(frozen=True)
class ActivePort:
    """A served service port as the portal rules need it."""

    port: ServicePort
    proxy_port: int
    has_endpoints: bool
    #: `externalTrafficPolicy: Local`: the proxy port external paths go to (0: none), and
    #: whether it has an endpoint on this node (without one, external traffic is dropped).
    external_proxy_port: int = 0
    has_local_endpoints: bool = True


class Portals(Protocol):
    """What sends service traffic to the proxy ports (kernel rules, NodePort claims)."""

    async def sync(self, active: Sequence[ActivePort]) -> None:
        """Make the portals match the served ports; called after every proxier sync."""
        ...

    async def port_removed(self, port: ServicePort) -> None: ...

    def node_port_errors(self) -> dict[ServicePortName, str]:
        """Why a service port's NodePort is not served (a clash), per service port."""
        ...

    def handover_fds(self) -> list[tuple[str, int]]:
        """The NodePort claims' sockets, by hand-over key (a successor adopts them)."""
        ...

    async def close(self, *, keep_rules: bool = False) -> None:
        """Release the claims and remove the rules (unless a successor serves them)."""
        ...


class PortalRules(Protocol):
    """Where the portal rules are written (iptables chains, or an nftables table): the desired
    state is built on the event loop, applied and removed on the rule-writer thread."""

    @property
    def name(self) -> str:
        """What writes the rules, for messages."""
        ...

    @property
    def gaps_healed(self) -> int:
        """Full writes that found the rules missing (a first start, or someone else's
        flush): connections made in between bypassed the portals."""
        ...

    def build(self, ports: Iterable[PortalPort]) -> Any:
        """The desired rules for these served ports (cheap for ports that did not change)."""
        ...

    def apply(self, desired: Any, *, full: bool) -> None:
        """Make the kernel hold `desired`: full rewrites everything, else only what changed."""
        ...

    def remove(self) -> int:
        """Remove every portal rule of this backend; how many went."""
        ...
