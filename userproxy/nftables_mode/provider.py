"""`--proxy-mode nftables`: the same sources, change tracking and sync runner as the other
modes; the kernel's data plane in one nftables table per family (rules.py).

Syncs are incremental, as kube-proxy's: each service port's chains, affinity sets and map
elements form a plan, rebuilt only for the Services whose ports or endpoints changed, and a
sync writes only the difference, in one atomic `nft -f` transaction. Once per sync period (and
at start-up, and after any failure) the whole table is rewritten instead: every fixed chain
and map flushed and refilled, every service chain rewritten, stale ones removed. That repairs
whatever someone else changed or deleted.

A chain a map element pointed at cannot be deleted in the transaction that removes the
element on kernels before 6.2 (the reference is dropped a little later), so stale service
chains are flushed at once and deleted by a later sync, a second on, as kube-proxy does.
Rules stay when the proxy stops: the kernel keeps serving; `userproxy cleanup` removes them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from userproxy.changes import EndpointsCache, ServiceChangeTracker, ServiceKey, names_of
from userproxy.convert import EndpointsResult
from userproxy.iptables.writer import RuleWriter
from userproxy.kernelmodes import KernelServed, LoopbackFilter
from userproxy.model import Endpoint, ServicePort, ServicePortName
from userproxy.nftables.interface import Nftables, NftError
from userproxy.nftables.transaction import Chain, Element, Rule, Set, Transaction
from userproxy.nftables_mode import rules
from userproxy.nftables_mode.rules import Backed, NftConfig, ServicePlan
from userproxy.provider import EndpointStatus, ProxyStatus, ServicePortStatus
from userproxy.settings import Settings

log = structlog.get_logger("userproxy.nftables_mode")

#: Seconds a flushed chain waits before it is deleted (see the module docstring).
STALE_CHAIN_DELAY = 1.0

ElementKey = tuple[str, str]  # (set or map, key text)
#: Per changed service port: its plan before and after (None: it had or has none).
Updates = dict[ServicePortName, tuple[ServicePlan | None, ServicePlan | None]]


@dataclass
class Written:
    """What the table holds after the last transaction that landed."""

    #: Every element's owners: the service port whose element is in force is the first.
    claims: dict[ElementKey, dict[ServicePortName, Element]] = field(default_factory=dict)
    #: The element in force for each key.
    elements: dict[ElementKey, Element] = field(default_factory=dict)

    def in_force(self, key: ElementKey) -> Element | None:
        owners = self.claims.get(key)
        return owners[min(owners)] if owners else None


class NftablesProvider(KernelServed):
    """`--proxy-mode nftables` for one address family."""

    mode = "nftables"

    def __init__(
        self,
        *,
        settings: Settings,
        nft: Nftables,
        config: NftConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.nft = nft
        self.config = config or NftConfig()
        self.clock = clock
        self.tracker = ServiceChangeTracker()
        self.endpoints = EndpointsCache()
        self.ports: dict[ServicePortName, ServicePort] = {}
        self.request_sync: Callable[[], None] = lambda: None
        self._by_service: dict[ServiceKey, set[ServicePortName]] = {}
        self._dirty: set[ServiceKey] = set()
        self._backed: dict[ServicePortName, Backed] = {}
        self._plans: dict[ServicePortName, ServicePlan] = {}
        self._written: Written | None = None
        self._base_recreated = False
        #: Chains flushed as stale, by the time they were flushed (deleted a second later).
        self._stale_chains: dict[str, float] = {}
        self._loopback = LoopbackFilter()
        self._lock = asyncio.Lock()
        self._thread = RuleWriter(full_sync_period=settings.sync_period, clock=clock)
        #: `kubeproxy_sync_proxy_rules_nftables_{sync,cleanup}_failures_total`.
        self.sync_failures = 0
        self.cleanup_failures = 0

    # ------------------------------------------------------------------ source handlers
    def on_service(self, key: ServiceKey, ports: tuple[ServicePort, ...] | None) -> None:
        self.tracker.record(key, ports)
        self.request_sync()

    def on_endpoints(self, result: EndpointsResult) -> None:
        self.endpoints.update(result)
        self._dirty.add(result.service)
        self.request_sync()

    def on_endpoints_deleted(self, service: ServiceKey, source: str) -> None:
        self.endpoints.delete(service, source)
        self._dirty.add(service)
        self.request_sync()

    # ------------------------------------------------------------------ sync
    async def start(self) -> None:
        """Nothing to start: the kernel carries the traffic."""

    async def sync(self) -> None:
        async with self._lock:
            changed = self._take_changes()
            plans = {name: self._plans.get(name) for name in changed}
            for name in changed:
                self._replan(name)
            updates = {
                name: (old, self._plans.get(name))
                for name, old in plans.items()
                if old is not self._plans.get(name)
            }
            try:
                await self._thread.write(lambda full: self._write(full, updates))
            except NftError:
                self.sync_failures += 1
                raise
            if self._stale_chains:
                asyncio.get_running_loop().call_later(STALE_CHAIN_DELAY + 0.1, self.request_sync)

    def _take_changes(self) -> set[ServicePortName]:
        """The service ports whose Service or endpoints changed since the last sync."""
        changed: set[ServicePortName] = set()
        for key, (previous, current) in self.tracker.take().items():
            before, after = names_of(previous), names_of(current)
            for name in before.keys() - after.keys():
                self.ports.pop(name, None)
            self.ports.update(after)
            self._by_service[key] = set(after)
            if not after:
                del self._by_service[key]
            changed |= before.keys() | after.keys()
        for key in self._dirty:
            changed |= self._by_service.get(key, set())
        self._dirty.clear()
        return changed

    def _replan(self, name: ServicePortName) -> None:
        port = self.ports.get(name)
        if port is None:
            self._backed.pop(name, None)
            self._plans.pop(name, None)
            return
        backed = self._backed_of(port)
        if self._backed.get(name) == backed and name in self._plans:
            return
        self._backed[name] = backed
        self._plans[name] = rules.plan(backed, self.config)

    def _backed_of(self, port: ServicePort) -> Backed:
        name = port.name
        topology = self.settings.topology
        cluster = self.endpoints.endpoints(name, topology=topology)
        local = self.endpoints.endpoints(name, local_node=self.settings.node_name)
        return Backed(
            port,
            tuple(self._loopback.routable(name, cluster)),
            tuple(self._loopback.routable(name, local)),
        )

    # ------------------------------------------------------------------ writing (rule thread)
    def _write(self, full: bool, updates: Updates) -> None:
        self._delete_stale_chains()
        written, self._written = self._written, None  # unknown until a transaction lands
        if not full and written is not None:
            tx, after = self._partial_transaction(updates, written)
            try:
                self.nft.run(tx)
                self._written = after
                return
            except NftError as err:
                # Someone changed the table under us (a chain or element we rely on is gone):
                # rewrite it whole now rather than after a retry interval.
                self.sync_failures += 1
                log.info("Rewriting the nftables table after a partial update failed.",
                         reason=str(err))  # fmt: skip
        tx, after = self._full_transaction()
        self.nft.run(tx)
        self._written = after

    def _delete_stale_chains(self) -> None:
        due = self.clock() - STALE_CHAIN_DELAY
        old = [name for name, flushed in self._stale_chains.items() if flushed <= due]
        if not old:
            return
        tx = self._tx()
        for name in old:
            tx.delete(Chain(name))
            del self._stale_chains[name]
        try:
            self.nft.run(tx)
        except NftError as err:
            # Still there: the next full sync finds them stale again.
            self.cleanup_failures += 1
            log.warning("Could not delete stale nftables chains; will retry.", reason=str(err))

    def _tx(self) -> Transaction:
        return Transaction(self.config.nft_family, rules.TABLE)

    def _full_transaction(self) -> tuple[Transaction, Written]:
        existing_chains, existing_sets = self._existing()
        present = set(existing_chains)
        tx = self._tx()
        rules.setup(tx, self.config, recreate_base=not self._base_recreated)
        self._base_recreated = True
        written = Written()
        chains: dict[str, tuple[Rule, ...]] = {}
        sets: dict[str, Set] = {}
        for name, plan in self._plans.items():
            chains.update(plan.chains)
            sets.update((s.name, s) for s in plan.sets)
            for element in plan.elements:
                written.claims.setdefault((element.container, element.key_text), {})[name] = element
        for s in sets.values():
            tx.add(s)
        for chain in chains:
            tx.add(Chain(chain))
        for chain, chain_rules in chains.items():
            if chain in present:  # a new chain is empty: flushing it only costs nft time
                tx.flush(Chain(chain))
            for rule in chain_rules:
                tx.add(rule)
        for key in written.claims:
            chosen = written.in_force(key)
            assert chosen is not None
            written.elements[key] = chosen
            tx.add(chosen)
        now = self.clock()
        for chain in existing_chains:
            if rules.is_service_chain(chain) and chain not in chains:
                tx.flush(Chain(chain))
                self._stale_chains.setdefault(chain, now)
        for set_name in existing_sets:
            if set_name.startswith(rules.AFFINITY_PREFIX) and set_name not in sets:
                tx.delete(Set(set_name, self.config.addr_type))
        return tx, written

    def _existing(self) -> tuple[list[str], list[str]]:
        try:
            return self.nft.chains(), self.nft.sets()
        except NftError as err:
            log.warning("Cannot list the nftables table: stale chains stay for now.",
                        reason=str(err))  # fmt: skip
            return [], []

    def _partial_transaction(
        self,
        updates: Updates,
        before: Written,
    ) -> tuple[Transaction, Written]:
        tx = self._tx()
        claims = dict(before.claims)
        elements = dict(before.elements)
        touched: set[ElementKey] = set()
        new_sets: list[Set] = []
        gone_sets: list[Set] = []
        changed_chains: list[tuple[str, tuple[Rule, ...]]] = []
        gone_chains: list[str] = []
        for name, (old, new) in sorted(updates.items()):
            old, new = old or ServicePlan(), new or ServicePlan()
            old_chains, new_chains = dict(old.chains), dict(new.chains)
            changed_chains += [(c, r) for c, r in new.chains if old_chains.get(c) != r]
            gone_chains += [c for c in old_chains if c not in new_chains]
            old_sets = {s.name for s in old.sets}
            new_set_names = {s.name for s in new.sets}
            new_sets += [s for s in new.sets if s.name not in old_sets]
            gone_sets += [s for s in old.sets if s.name not in new_set_names]
            for element in old.elements:
                key = (element.container, element.key_text)
                owners = dict(claims.get(key, {}))
                owners.pop(name, None)
                claims[key] = owners
                touched.add(key)
            for element in new.elements:
                key = (element.container, element.key_text)
                owners = dict(claims.get(key, {}))
                owners[name] = element
                claims[key] = owners
                touched.add(key)
        written = Written(claims, elements)
        for s in new_sets:
            tx.add(s)
        for chain, _ in changed_chains:
            tx.add(Chain(chain))
        for chain, chain_rules in changed_chains:
            tx.flush(Chain(chain))
            for rule in chain_rules:
                tx.add(rule)
        adds: list[Element] = []
        for key in sorted(touched):
            if not claims.get(key):
                claims.pop(key, None)
            now_in_force = written.in_force(key)
            was = elements.get(key)
            if now_in_force == was:
                continue
            if was is not None:
                tx.delete(was)
                del elements[key]
            if now_in_force is not None:
                adds.append(now_in_force)
                elements[key] = now_in_force
        for element in adds:
            tx.add(element)
        now = self.clock()
        for chain in gone_chains:
            tx.flush(Chain(chain))
            self._stale_chains.setdefault(chain, now)
        for s in gone_sets:
            tx.delete(s)
        return tx, written

    # ------------------------------------------------------------------ status
    async def read_counters(self) -> None:
        """The kernel counts nothing here (no counters in the rules, as kube-proxy)."""

    def status(self) -> ProxyStatus:
        return ProxyStatus(
            mode=self.mode,
            service_ports=tuple(self._port_status(b) for _, b in sorted(self._backed.items())),
            pending_service_changes=self.tracker.pending,
            failures=(
                ("nftables_sync", self.sync_failures),
                ("nftables_cleanup", self.cleanup_failures),
            ),
        )

    def _port_status(self, backed: Backed) -> ServicePortStatus:
        port = backed.port
        shown: Iterable[Endpoint] = backed.local if port.internal_local else backed.cluster
        return ServicePortStatus(
            port=port,
            proxy_port=None,
            has_endpoints=bool(backed.cluster or backed.local),
            local_endpoints=len(backed.local),
            endpoints=tuple(EndpointStatus(ep) for ep in shown),
        )


def cleanup(nft: Nftables) -> int:
    """Delete the table (1 if there was one)."""
    return 1 if nft.delete_table() else 0
