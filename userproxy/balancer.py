"""Round-robin endpoint choice with ClientIP session affinity. Pure: time is passed in.

Semantics follow the old userspace proxier's LoadBalancerRR (reference section 3.1-3.3), with
its known affinity bug fixed: the affinity policy is stored apart from the endpoint state, so
`timeoutSeconds` holds whichever of Service and endpoints arrives first, and a change of the
timeout alone takes effect at once.

- Each service port keeps its endpoints in a random order; picks walk that order. The order
  and the position are reset only when the endpoint *set* changes, never on a reordering.
- With ClientIP affinity a client IP is pinned to the endpoint of its last pick while it keeps
  coming back within the timeout (a sliding window, measured in whole seconds as kube-proxy did).
- `reset=True` (used after a failed dial) ignores the pin, takes the next endpoint in turn and
  pins the client to it.
- An endpoint on loopback (how the no-cluster modes reach backends on the node; the API server
  never allows one) is picked only for clients on this node: a pod must not reach the node's
  private listeners through a ClusterIP. Other clients skip it, or find no endpoint.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from userproxy.model import NO_AFFINITY, Affinity, Endpoint, ServicePortName, is_loopback


class BalancerError(LookupError):
    pass


class MissingService(BalancerError):
    def __init__(self, name: ServicePortName) -> None:
        super().__init__(f"{name}: missing service entry")


class NoEndpoints(BalancerError):
    def __init__(self, name: ServicePortName) -> None:
        super().__init__(f"{name}: missing endpoints")


@dataclass(slots=True)
class _Session:
    endpoint: Endpoint
    last_used: float


@dataclass(slots=True)
class _PortState:
    endpoints: list[Endpoint] = field(default_factory=list)
    index: int = 0
    sessions: dict[str, _Session] = field(default_factory=dict)
    #: Loopback endpoints: only clients on this node may be sent to them.
    node_only: frozenset[Endpoint] = frozenset()


Shuffle = Callable[[list[Endpoint]], None]
#: Whether a client address is on this node (and so may reach loopback endpoints).
NodeClient = Callable[[str], bool]


def _loopback(ip: str) -> bool:
    try:
        return is_loopback(ip)
    except ValueError:  # not an address: a name, or no client (a caller that does not track them)
        return False


class RoundRobinBalancer:
    def __init__(
        self, *, shuffle: Shuffle = random.shuffle, is_node_client: NodeClient = _loopback
    ) -> None:
        self._shuffle = shuffle
        self._is_node_client = is_node_client
        self._ports: dict[ServicePortName, _PortState] = {}
        self._affinity: dict[ServicePortName, Affinity] = {}

    # ------------------------------------------------------------------ configuration
    def set_affinity(self, name: ServicePortName, affinity: Affinity) -> None:
        """Record the service port's affinity policy (called whenever its Service is known)."""
        self._affinity[name] = affinity
        state = self._ports.get(name)
        if state is not None and not affinity.client_ip:
            state.sessions.clear()

    def update_endpoints(self, name: ServicePortName, endpoints: Iterable[Endpoint]) -> bool:
        """Replace the endpoint set. Returns whether the set changed (and the order was reset)."""
        new = list(dict.fromkeys(endpoints))
        state = self._ports.get(name)
        if state is None:
            state = self._ports[name] = _PortState()
        elif set(new) == set(state.endpoints):
            return False
        alive = set(new)
        state.sessions = {ip: s for ip, s in state.sessions.items() if s.endpoint in alive}
        self._shuffle(new)
        state.endpoints = new
        state.index = 0
        state.node_only = frozenset(e for e in new if _loopback(e.ip))
        return True

    def delete_service(self, name: ServicePortName) -> None:
        """Forget the service port entirely: picks fail with MissingService until it returns."""
        self._ports.pop(name, None)
        self._affinity.pop(name, None)

    # ------------------------------------------------------------------ picking
    def next_endpoint(
        self, name: ServicePortName, client_ip: str, *, now: float, reset: bool = False
    ) -> Endpoint:
        state = self._ports.get(name)
        if state is None:
            raise MissingService(name)
        if not state.endpoints:
            raise NoEndpoints(name)
        affinity = self._affinity.get(name, NO_AFFINITY)
        if affinity.client_ip and not reset:
            session = state.sessions.get(client_ip)
            if session is not None and int(now - session.last_used) < affinity.timeout_s:
                session.last_used = now
                return session.endpoint
        if state.node_only and not self._is_node_client(client_ip):
            endpoint = self._advance(state, name, skip=state.node_only)
        else:  # the common case, kept to two list operations (a per-connection path)
            endpoint = state.endpoints[state.index]
            state.index = (state.index + 1) % len(state.endpoints)
        if affinity.client_ip:
            state.sessions[client_ip] = _Session(endpoint, now)
        return endpoint

    @staticmethod
    def _advance(state: _PortState, name: ServicePortName, skip: frozenset[Endpoint]) -> Endpoint:
        """The next endpoint in turn that is not in `skip`."""
        count = len(state.endpoints)
        for _ in range(count):
            endpoint = state.endpoints[state.index]
            state.index = (state.index + 1) % count
            if endpoint not in skip:
                return endpoint
        raise NoEndpoints(name)

    def cleanup_stale_sessions(self, now: float) -> int:
        """Drop pins idle for at least their timeout. Returns how many were dropped."""
        dropped = 0
        for name, state in self._ports.items():
            ttl = self._affinity.get(name, NO_AFFINITY).timeout_s
            stale = [ip for ip, s in state.sessions.items() if int(now - s.last_used) >= ttl]
            for ip in stale:
                del state.sessions[ip]
            dropped += len(stale)
        return dropped

    # ------------------------------------------------------------------ introspection
    def endpoints(self, name: ServicePortName) -> tuple[Endpoint, ...]:
        """The endpoints in pick order (the shuffled list)."""
        state = self._ports.get(name)
        return tuple(state.endpoints) if state else ()

    def sessions(self, name: ServicePortName) -> dict[str, Endpoint]:
        state = self._ports.get(name)
        return {ip: s.endpoint for ip, s in state.sessions.items()} if state else {}

    def has_service(self, name: ServicePortName) -> bool:
        return name in self._ports
