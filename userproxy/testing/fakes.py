"""Faithful fakes of the proxy's kernel side effects, for tests without root.

- `FakeIptables` keeps tables in memory and applies restore batches the way
  `iptables-restore --noflush` does: a declared chain is created or flushed, `-D` of a rule
  that is not there, `-A` to a missing chain, `-X` of a chain still referenced or not empty,
  and a jump to a missing chain are refused; each table commits whole or not at all, in
  batch order (so a later table's refusal leaves earlier tables committed, unless the batch
  was tested first). Every batch is recorded.
- `FakeConntrack` records what was flushed.
- `FakeClaimer` holds NodePorts in memory; ports in `taken` are someone else's.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

from userproxy.iptables.interface import RulesError, Variant
from userproxy.iptables.rule import quote
from userproxy.iptables.text import BatchError, Op, TableBatch, jump_target, parse_batch
from userproxy.model import Family, Protocol, ServicePort

BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
}
#: Targets that are not chains.
VERDICTS = frozenset(
    [
        "ACCEPT",
        "DROP",
        "RETURN",
        "REJECT",
        "DNAT",
        "SNAT",
        "REDIRECT",
        "MASQUERADE",
        "MARK",
        "LOG",
        "CONNMARK",
    ]
)

Tables = dict[str, dict[str, list[str]]]  # table -> chain -> rule arguments, as text


class FakeIptables:
    def __init__(self, variant: Variant = "nft", family: Family = Family.IPv4) -> None:
        self.variant = variant
        self.family = family
        self.tables: Tables = {t: {c: [] for c in cs} for t, cs in BUILTIN_CHAINS.items()}
        #: Every batch given to `restore`, in order (refused ones too).
        self.restores: list[str] = []
        #: The next restore fails with this message (fault injection), once.
        self.fail_next: str | None = None
        #: Packets `save(counters=True)` reports for each rule of a (table, chain).
        self.packets: dict[tuple[str, str], int] = {}
        self.installed = True

    @property
    def name(self) -> str:
        return f"iptables-{self.variant}-restore (fake)"

    def available(self) -> bool:
        return self.installed

    # ------------------------------------------------------------------ reading
    def save(self, table: str, *, counters: bool = False) -> str:
        if not self.installed or table not in self.tables:
            return ""
        chains = self.tables[table]
        out = [f"*{table}"]
        for chain in chains:
            policy = "ACCEPT" if chain in BUILTIN_CHAINS.get(table, ()) else "-"
            out.append(f":{chain} {policy} [0:0]")
        for chain, rules in chains.items():
            count = f"[{self.packets.get((table, chain), 0)}:0] " if counters else ""
            out += [f"{count}-A {chain} {args}" for args in rules]
        out.append("COMMIT")
        return "\n".join(out) + "\n"

    def list_rules(self, table: str, chain: str) -> str:
        rules = self.tables.get(table, {}).get(chain)
        if rules is None:
            raise RulesError(f"no chain {chain} in {table}")
        head = f"-P {chain} ACCEPT" if chain in BUILTIN_CHAINS.get(table, ()) else f"-N {chain}"
        return "\n".join([head, *(f"-A {chain} {args}" for args in rules)]) + "\n"

    def rules(self, table: str, chain: str) -> list[str]:
        """`-A` lines of one chain, as `Rule.line` spells them."""
        return [f"-A {chain} {args}" for args in self.tables[table][chain]]

    # ------------------------------------------------------------------ writing
    def restore(self, text: str, *, test_first: bool = False) -> None:
        self.restores.append(text)
        if self.fail_next is not None:
            message, self.fail_next = self.fail_next, None
            raise RulesError(message)
        try:
            batches = parse_batch(text)
        except BatchError as err:
            raise RulesError(str(err)) from None
        if test_first:
            trial = copy.deepcopy(self.tables)
            for batch in batches:
                trial[batch.table] = self._applied(trial, batch)
        for batch in batches:
            self.tables[batch.table] = self._applied(self.tables, batch)

    def _applied(self, tables: Tables, batch: TableBatch) -> dict[str, list[str]]:
        if batch.table not in tables:
            raise RulesError(f"table {batch.table} does not exist")
        chains = {c: list(rules) for c, rules in tables[batch.table].items()}
        for name in batch.declared:
            chains[name] = []
        for op in batch.ops:
            self._apply(chains, op, batch.table)
        for chain, rules in chains.items():
            for args in rules:
                target = jump_target(args.split())
                if target and target not in VERDICTS and target not in chains:
                    raise RulesError(f"{chain}: jump to missing chain {target}")
        return chains

    def _apply(self, chains: dict[str, list[str]], op: Op, table: str) -> None:
        if op.verb == "-X":
            if chains.get(op.chain):
                raise RulesError(f"cannot delete chain {op.chain}: not empty")
            if any(jump_target(a.split()) == op.chain for rs in chains.values() for a in rs):
                raise RulesError(f"cannot delete chain {op.chain}: still referenced")
            if chains.pop(op.chain, None) is None:
                raise RulesError(f"cannot delete chain {op.chain}: no such chain")
            return
        if op.chain not in chains:
            raise RulesError(f"no chain {op.chain} in {table}")
        args = " ".join(quote(a) for a in op.args)
        rules = chains[op.chain]
        if op.verb == "-A":
            rules.append(args)
        elif op.verb == "-I":
            rules.insert(op.position - 1, args)
        elif args in rules:
            rules.remove(args)
        else:
            raise RulesError(f"-D {op.chain} {args}: no such rule")


@dataclass
class FakeConntrack:
    """Records the service ports whose conntrack entries were flushed."""

    flushed: list[ServicePort] = field(default_factory=list)
    batches: int = 0
    #: One list per flush of the entries made while the rules were absent.
    unredirected: list[list[ServicePort]] = field(default_factory=list)

    def flush_udp(self, ports: Sequence[ServicePort]) -> None:
        self.flushed.extend(ports)
        self.batches += 1

    def flush_unredirected(self, ports: Sequence[ServicePort]) -> None:
        self.unredirected.append(list(ports))


@dataclass
class FakeClaimer:
    """NodePort claims in memory; `taken` holds (protocol, port) pairs others have bound."""

    taken: set[tuple[Protocol, int]] = field(default_factory=set)
    held: set[tuple[Protocol, int]] = field(default_factory=set)

    def claim(self, protocol: Protocol, port: int) -> object:
        if (protocol, port) in self.taken or (protocol, port) in self.held:
            raise OSError(98, "Address already in use")
        self.held.add((protocol, port))
        return (protocol, port)

    def release(self, claim: object) -> None:
        assert isinstance(claim, tuple)
        self.held.discard(claim)

    def fileno(self, claim: object) -> int:
        assert isinstance(claim, tuple)
        return -int(claim[1])  # a stand-in descriptor, distinct per port
