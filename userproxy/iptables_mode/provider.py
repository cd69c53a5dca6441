"""`--proxy-mode iptables`: the same sources, change tracking and sync runner as the userspace
mode, but the data plane is the kernel's (rules.py). No listeners, no relays.

Writes go through iptables-restore (legacy or nft, following the host) as atomic batches:
only the chains whose content changed are rewritten, except once per sync period (and at
startup, and after a failure), when every chain is rewritten, stale chains are deleted and
missing jumps are put back. Rules stay in place when the proxy stops, so traffic keeps
flowing across a restart; `userproxy cleanup` removes them.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import structlog

from userproxy.changes import EndpointsCache, ServiceChangeTracker, ServiceKey, names_of
from userproxy.convert import EndpointsResult
from userproxy.iptables.cleanup import dumps, owned_text, remove_owned
from userproxy.iptables.interface import Iptables
from userproxy.iptables.rule import NAT, Ruleset, plan_jumps
from userproxy.iptables.text import builtin_chain_lines, chain_names, chains_text, jump_targets
from userproxy.iptables.writer import RuleWriter
from userproxy.iptables_mode import rules
from userproxy.kernelmodes import KernelServed, LoopbackFilter
from userproxy.model import ServicePort, ServicePortName
from userproxy.provider import EndpointStatus, ProxyStatus, ServicePortStatus
from userproxy.settings import Settings

log = structlog.get_logger("userproxy.iptables_mode")


class KernelRuleWriter:
    """Writes the iptables-mode ruleset: only chains whose content changed, except on full
    syncs, which rewrite every chain, delete stale ones and put missing jumps back."""

    def __init__(self, iptables: Iptables) -> None:
        self.iptables = iptables
        self._written: Ruleset | None = None

    def apply(self, desired: Ruleset, *, full: bool) -> None:
        written, self._written = self._written, None  # unknown until this batch lands
        if full or written is None:
            # One dump per table gives both the chains that exist and the built-in chains'
            # jumps.
            texts = dumps(self.iptables, rules.TABLES)
            existing = {t: chain_names(text) for t, text in texts.items()}
            present = builtin_chain_lines(texts, rules.JUMPS)
            targets = {k: jump_targets(v) for k, v in present.items()}
            plan = plan_jumps(targets, rules.JUMPS)
            text = chains_text(desired, None, existing, rules.owned, add_jumps=plan.add)
        else:
            existing = {t: set(written.chains[t]) for t in rules.TABLES}
            text = chains_text(desired, written, existing, rules.owned)
        if text:
            self.iptables.restore(text, test_first=True)
        self._written = desired

    def packet_counts(self) -> dict[str, int]:
        """Packets through each KUBE-SEP chain's DNAT rule: in the nat table only the first
        packet of a connection (or UDP flow) is seen, so this counts connections."""
        counts: dict[str, int] = {}
        for m in _SEP_DNAT.finditer(self.iptables.save(NAT, counters=True)):
            counts[m["chain"]] = counts.get(m["chain"], 0) + int(m["packets"])
        return counts


_SEP_DNAT = re.compile(r"^\[(?P<packets>\d+):\d+\] -A (?P<chain>KUBE-SEP-\w+) .*-j DNAT", re.M)


def _ours_here(iptables: Iptables) -> dict[str, str] | None:
    """The variant's table dumps if userproxy's iptables mode wrote into it (the marker
    chain exists), else None: kube-proxy's chains of the same names are never touched."""
    texts = dumps(iptables, rules.TABLES)
    return texts if f":{rules.MARKER} " in texts[NAT] else None


def cleanup(iptables: Iptables) -> int:
    """Remove iptables-mode chains and jumps from one variant, if userproxy wrote them."""
    texts = _ours_here(iptables)
    return 0 if texts is None else remove_owned(iptables, texts, rules.owned)


def owned_rules_text(iptables: Iptables) -> str:
    """The iptables-mode rules userproxy wrote into one variant, in iptables-save form."""
    texts = _ours_here(iptables)
    return "" if texts is None else owned_text(iptables, texts, rules.owned, " (iptables mode)")


class IptablesProvider(KernelServed):
    """`--proxy-mode iptables`: sources' changes become kernel rules at each sync."""

    mode = "iptables"

    def __init__(
        self,
        *,
        settings: Settings,
        writer: KernelRuleWriter,
        config: rules.KernelConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.writer = writer
        self.config = config or rules.KernelConfig()
        self.tracker = ServiceChangeTracker()
        self.endpoints = EndpointsCache()
        self.ports: dict[ServicePortName, ServicePort] = {}
        self.request_sync: Callable[[], None] = lambda: None
        self._lock = asyncio.Lock()
        self._thread = RuleWriter(full_sync_period=settings.sync_period, clock=clock)
        #: Connections through each KUBE-SEP chain, as last read (`read_counters`).
        self._kernel_counts: dict[str, int] = {}
        self._loopback = LoopbackFilter()

    # ------------------------------------------------------------------ source handlers
    def on_service(self, key: ServiceKey, ports: tuple[ServicePort, ...] | None) -> None:
        self.tracker.record(key, ports)
        self.request_sync()

    def on_endpoints(self, result: EndpointsResult) -> None:
        self.endpoints.update(result)
        self.request_sync()  # the kernel learns endpoint changes only through a sync

    def on_endpoints_deleted(self, service: ServiceKey, source: str) -> None:
        self.endpoints.delete(service, source)
        self.request_sync()

    # ------------------------------------------------------------------ sync
    async def start(self) -> None:
        """Nothing to start: the kernel carries the traffic."""

    def backed(self) -> list[rules.Backed]:
        out = []
        for name, port in sorted(self.ports.items()):
            local = self.settings.node_name if port.internal_local else None
            endpoints = tuple(
                self._loopback.routable(
                    name,
                    self.endpoints.endpoints(
                        name, local_node=local, topology=self.settings.topology
                    ),
                )
            )
            here = self.endpoints.endpoints(name, local_node=self.settings.node_name)
            out.append(rules.Backed(port, endpoints, tuple(self._loopback.routable(name, here))))
        return out

    async def sync(self) -> None:
        async with self._lock:
            for _, (previous, current) in self.tracker.take().items():
                for name in names_of(previous).keys() - names_of(current).keys():
                    self.ports.pop(name, None)
                self.ports.update(names_of(current))
            ruleset = rules.build(self.backed(), self.config)
            await self._thread.write(lambda full: self.writer.apply(ruleset, full=full))

    # ------------------------------------------------------------------ status
    async def read_counters(self) -> None:
        self._kernel_counts = await self._thread.run(self.writer.packet_counts)

    def status(self) -> ProxyStatus:
        counts = self._kernel_counts
        return ProxyStatus(
            mode=self.mode,
            service_ports=tuple(
                ServicePortStatus(
                    port=b.port,
                    proxy_port=None,
                    has_endpoints=bool(b.endpoints),
                    local_endpoints=len(
                        self.endpoints.endpoints(b.port.name, local_node=self.settings.node_name)
                    ),
                    endpoints=tuple(
                        EndpointStatus(
                            ep, kernel_connections=counts.get(rules.endpoint_chain(b.port, ep), 0)
                        )
                        for ep in b.endpoints
                    ),
                )
                for b in self.backed()
            ),
            pending_service_changes=self.tracker.pending,
        )
