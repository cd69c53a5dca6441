"""`ChainSync`: keeps a fixed set of chains, and the jumps into them from built-in chains,
equal to a desired `Ruleset`, through any `Iptables`.

Full syncs flush and refill every chain (declaring a chain in a `--noflush` batch flushes
it) and put missing or misplaced jumps back, in one batch: that is the reconcile, and why a
rule deleted by someone else comes back. Partial syncs trust that the kernel still holds what
the previous call wrote and delete and append only the rules that changed (a 10,000-port node
pays for one change, not for 30,000 rules); if that fails (a rule we delete was deleted by
someone else) it falls back to a full sync at once. For chains whose order carries no meaning.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from userproxy.iptables.interface import Iptables, RulesError
from userproxy.iptables.rule import Jump, Ruleset, diff, plan_jumps
from userproxy.iptables.text import (
    builtin_chain_lines,
    change_text,
    flush_text,
    jump_target,
    jump_targets,
)

log = structlog.get_logger("userproxy.iptables")


class ChainSync:
    def __init__(self, iptables: Iptables, jumps: Sequence[Jump]) -> None:
        self.iptables = iptables
        self.jumps = tuple(jumps)
        self._written: Ruleset | None = None
        #: Full writes that found our jumps missing (a first start, or a flush healed).
        self.jumps_restored = 0

    @property
    def name(self) -> str:
        return self.iptables.name

    def apply(self, ruleset: Ruleset, *, full: bool = True) -> None:
        written, self._written = self._written, None  # unknown until this batch lands
        if full or written is None:
            self.iptables.restore(self._full_text(ruleset), test_first=_has_new(ruleset, written))
        else:
            changes = diff(written, ruleset)
            text = change_text(changes, ruleset.chains)
            if text:
                added = any(c.added for t in changes.values() for c in t.values())
                try:
                    self.iptables.restore(text, test_first=added)
                except RulesError as err:
                    log.info(
                        "Rewriting every owned chain after a partial update failed.",
                        reason=str(err),
                    )
                    self.iptables.restore(self._full_text(ruleset), test_first=True)
        self._written = ruleset

    def _full_text(self, ruleset: Ruleset) -> str:
        current = builtin_chain_lines(
            {table: self._list_builtins(table) for table in ruleset.chains}, self.jumps
        )
        plan = plan_jumps({key: jump_targets(lines) for key, lines in current.items()}, self.jumps)
        if plan.add:
            self.jumps_restored += 1
        delete: dict[str, list[str]] = {}
        for jump in plan.remove:
            lines = current[(jump.table, jump.chain)]
            doomed = [ln for ln in lines if jump_target(ln.split()) == jump.rule.target.name]
            delete.setdefault(jump.table, []).extend(doomed)
        return flush_text(ruleset, delete_lines=delete, add_jumps=plan.add)

    def _list_builtins(self, table: str) -> str:
        """`-S` of the built-in chains holding our jumps: with nft this reads only those
        chains (a full save of a 30,000-rule table takes ~0.4 s)."""
        chains = sorted({j.chain for j in self.jumps if j.table == table})
        return "\n".join(self.iptables.list_rules(table, chain) for chain in chains)


def _has_new(ruleset: Ruleset, written: Ruleset | None) -> bool:
    if written is None:
        return True
    known = {
        rule for chains in written.chains.values() for rules in chains.values() for rule in rules
    }
    return any(
        rule not in known
        for chains in ruleset.chains.values()
        for rules in chains.values()
        for rule in rules
    )
