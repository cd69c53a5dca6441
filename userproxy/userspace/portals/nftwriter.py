"""`NftPortals`: keeps the `userproxy-portals` table equal to each sync's desired elements.

Full writes recreate the table's chains and sets and add every element, in one transaction
(the reconcile: whatever someone else deleted comes back); partial writes add and delete only
the elements that changed. A full write that finds the table missing counts as a healed gap
(the manager then clears conntrack entries made while the portals were absent).
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from userproxy.nftables.interface import Nftables, NftError
from userproxy.nftables.transaction import Element, Transaction
from userproxy.userspace.portals.nftrules import (
    PORT_CONTAINERS,
    Desired,
    ElementBuilder,
    ElementKey,
    Layout,
    setup,
)
from userproxy.userspace.portals.rules import PortalPort

log = structlog.get_logger("userproxy.userspace.portals")


class NftPortals:
    def __init__(self, nft: Nftables, builder: ElementBuilder) -> None:
        self.nft = nft
        self.builder = builder
        #: Whether the kernel holds what the builder had at the last write.
        self._written = False
        self._recreated = False
        #: Full writes that found the table missing (a first start, or a deletion healed).
        self.gaps_healed = 0

    @property
    def name(self) -> str:
        return self.nft.name

    @property
    def layout(self) -> Layout:
        return self.builder.layout

    def build(self, ports: Iterable[PortalPort]) -> Desired:
        return self.builder.build(ports)

    def apply(self, desired: Desired, *, full: bool) -> None:
        written, self._written = self._written, False  # unknown until this lands
        if full or not written:
            self._full(desired)
        else:
            tx = Transaction(self.nft.family, self.nft.table)
            _changes(tx, self.builder.delta, desired)
            try:
                self.nft.run(tx)
            except NftError as err:
                # Someone changed the table (an element we delete is gone): rewrite it whole.
                log.info("Rewriting the portal table after a partial update failed.",
                         reason=str(err))  # fmt: skip
                self._full(desired)
        self.builder.written()
        self._written = True

    def _full(self, desired: Desired) -> None:
        tx = Transaction(self.nft.family, self.nft.table)
        try:
            missing = not self.nft.exists()
        except NftError:
            missing = True
        setup(tx, self.layout, recreate_base=not self._recreated)
        for name in PORT_CONTAINERS:
            for element in desired[name].values():
                tx.add(element)
        self.nft.run(tx)
        self._recreated = True
        if missing:
            self.gaps_healed += 1

    def remove(self) -> int:
        self._written = False
        return 1 if self.nft.delete_table() else 0


def _changes(tx: Transaction, delta: dict[ElementKey, Element | None], now: Desired) -> None:
    """Deletes, then adds, of the elements whose key changed since the last write."""
    adds = []
    for (container, key), before in delta.items():
        after = now[container].get(key)
        if after == before:
            continue
        if before is not None:
            tx.delete(before)
        if after is not None:
            adds.append(after)
    for element in adds:
        tx.add(element)
