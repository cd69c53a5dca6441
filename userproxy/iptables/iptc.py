"""`Iptables` on python-iptables (libiptc): legacy x_tables only, IPv4.

Restore batches are parsed and every rule is built before the first commit, so a rule
libxtables refuses changes nothing (the equivalent of `--test`); then each table is edited
on a fresh handle and committed, in batch order. libiptc takes no lock, so the xtables lock
is held around the commits, and a commit that loses a race with another writer (EAGAIN) is
retried. Reads go through `iptables-legacy-save`, which prints what libiptc wrote.
"""

from __future__ import annotations

import time
from typing import Any

from userproxy.iptables.exec import ExecIptables
from userproxy.iptables.interface import RulesError, Variant
from userproxy.iptables.lock import xtables_lock
from userproxy.iptables.text import BatchError, Op, TableBatch, jump_target, parse_batch
from userproxy.model import Family

#: Rule attributes python-iptables sets directly, by iptables option.
_RULE_OPTIONS = {"-p": "protocol", "-d": "dst", "-s": "src", "-i": "in_interface"}
_RULE_OPTIONS["-o"] = "out_interface"


class IptcIptables:
    variant: Variant = "legacy"
    family = Family.IPv4
    name = "python-iptables (legacy)"
    ATTEMPTS = 5
    #: Built rule objects kept (building one costs ~0.15 ms); bounded, forgetting old ones.
    MAX_ENTRIES = 1 << 18

    def __init__(self) -> None:
        try:
            import iptc
        except Exception as err:  # pragma: no cover - depends on the host's libiptc
            raise RulesError(f"python-iptables cannot load libiptc: {err}") from err
        self._iptc = iptc
        self._reader = ExecIptables("legacy")
        self._entries: dict[tuple[str, ...], Any] = {}

    def available(self) -> bool:
        return True

    def save(self, table: str, *, counters: bool = False) -> str:
        return self._reader.save(table, counters=counters)

    def list_rules(self, table: str, chain: str) -> str:
        return self._reader.list_rules(table, chain)

    def restore(self, text: str, *, test_first: bool = False) -> None:
        try:
            batches = parse_batch(text)
        except BatchError as err:
            raise RulesError(f"python-iptables cannot read the batch: {err}") from None
        # Build every rule first, so a refused one changes nothing. A jump to a chain this
        # batch creates can only be built once the chain exists (libiptc looks it up).
        created = {chain for batch in batches for chain in batch.declared}
        for batch in batches:
            for op in batch.ops:
                if op.verb != "-X" and jump_target(op.args) not in created:
                    self._entry(op.args)
        self._commit(batches)

    def _commit(self, batches: list[TableBatch]) -> None:
        for attempt in range(self.ATTEMPTS):
            try:
                with xtables_lock():
                    for batch in batches:
                        table = self._iptc.Table(batch.table, autocommit=False)
                        # The handle goes stale after every commit; refresh() also opens it
                        # in this thread's network namespace.
                        table.refresh()
                        self._edit(table, batch)
                        table.commit()
                        table.refresh()
                return
            except self._iptc.IPTCError as err:
                if "temporarily unavailable" not in str(err) or attempt == self.ATTEMPTS - 1:
                    raise RulesError(f"python-iptables could not commit: {err}") from err
                time.sleep(0.05 * 2**attempt)

    def _edit(self, table: Any, batch: TableBatch) -> None:
        iptc = self._iptc
        for name in batch.declared:
            if table.is_chain(name):
                iptc.Chain(table, name).flush()
            else:
                table.create_chain(name)
        for op in batch.ops:
            self._apply(table, op)

    def _apply(self, table: Any, op: Op) -> None:
        if op.verb == "-X":
            table.delete_chain(op.chain)
            return
        if not table.is_chain(op.chain):
            raise self._iptc.IPTCError(f"no chain {op.chain} in {table.name}")
        chain = self._iptc.Chain(table, op.chain)
        entry = self._entry(op.args)
        if op.verb == "-A":
            chain.append_rule(entry)
        elif op.verb == "-D":
            chain.delete_rule(entry)
        else:
            chain.insert_rule(entry, position=op.position - 1)

    def _entry(self, args: tuple[str, ...]) -> Any:
        entry = self._entries.get(args)
        if entry is None:
            try:
                entry = self._build(args)
            except Exception as err:
                raise RulesError(
                    f"python-iptables refused the rule {' '.join(args)!r}: {err}"
                ) from err
            if len(self._entries) >= self.MAX_ENTRIES:
                self._entries.clear()
            self._entries[args] = entry
        return entry

    def _build(self, args: tuple[str, ...]) -> Any:
        """A python-iptables rule from iptables arguments, matches in argument order (so
        iptables-save prints the same text whichever implementation wrote the rule)."""
        rule = self._iptc.Rule()
        part: Any = None  # the match or target later options belong to
        negate, i = False, 0
        while i < len(args):
            word = args[i]
            if word == "!":
                negate, i = True, i + 1
                continue
            if word in _RULE_OPTIONS:
                setattr(rule, _RULE_OPTIONS[word], ("!" if negate else "") + args[i + 1])
                i += 2
            elif word == "-m":
                part, i = rule.create_match(args[i + 1]), i + 2
            elif word == "-j":
                part, i = rule.create_target(args[i + 1]), i + 2
            elif word.startswith("--") and part is not None:
                has_value = i + 1 < len(args) and not args[i + 1].startswith(("-", "!"))
                value = args[i + 1] if has_value else ""
                setattr(part, word[2:].replace("-", "_"), ("!" if negate else "") + value)
                i += 2 if has_value else 1
            else:
                raise ValueError(f"cannot express {word!r}")
            negate = False
        return rule
