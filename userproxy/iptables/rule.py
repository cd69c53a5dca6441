"""iptables rules as data. Pure.

A `Rule` is a chain, matches and a target; its text (`line`) is what iptables-restore reads,
and equality goes through that text. The named match fields cover the userspace portals'
shapes; `matches` carries any other match arguments verbatim, in order (the iptables mode's
`recent`, `statistic` and `mark` matches). A `Ruleset` is the complete desired content of a
set of chains, per table.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

NAT, FILTER = "nat", "filter"


@dataclass(frozen=True)
class Target:
    name: str
    to_ports: int | None = None
    to_destination: str | None = None
    reject_with: str | None = None
    #: Any other target arguments, verbatim (`--or-mark 0x4000`, `--random-fully`).
    extra: tuple[str, ...] = ()

    def args(self) -> list[str]:
        a = ["-j", self.name]
        if self.to_ports is not None:
            a += ["--to-ports", str(self.to_ports)]
        if self.to_destination is not None:
            a += ["--to-destination", self.to_destination]
        if self.reject_with is not None:
            a += ["--reject-with", self.reject_with]
        return a + list(self.extra)


ACCEPT = Target("ACCEPT")
REFUSE = Target("REJECT", reject_with="icmp-port-unreachable")


@dataclass(frozen=True, eq=False)
class Rule:
    """One rule. Equal rules have equal text: equality and hashing go through `line`, which
    is computed once (diffing 30,000 rules field by field costs ~0.15 s per sync)."""

    chain: str
    target: Target
    comment: str | None = None
    protocol: str | None = None
    dport: int | None = None
    dst: str | None = None
    not_dst: str | None = None
    not_in_interface: str | None = None
    physdev_not_in: bool = False
    addrtype_local: bool = False
    ctstate_not_dnat: bool = False
    state_new: bool = False
    #: `-m multiport --dports`: up to 15 ports, a range `a:b` counting as two.
    dports: str | None = None
    #: Further match arguments, verbatim, after the named ones.
    matches: tuple[str, ...] = ()

    def args(self, *, quoted: bool = False) -> list[str]:
        """The rule as iptables arguments (without `-A CHAIN`), in kube-proxy's order;
        `quoted` quotes free text for iptables-restore."""
        a: list[str] = []
        if self.comment is not None:
            a += ["-m", "comment", "--comment", quote(self.comment) if quoted else self.comment]
        if self.protocol is not None:
            a += ["-p", self.protocol]
            if self.dport is not None:
                a += ["-m", self.protocol, "--dport", str(self.dport)]
        if self.dports is not None:
            a += ["-m", "multiport", "--dports", self.dports]
        if self.dst is not None:
            a += ["-d", self.dst]
        if self.not_dst is not None:
            a += ["!", "-d", self.not_dst]
        if self.not_in_interface is not None:
            a += ["!", "-i", self.not_in_interface]
        if self.physdev_not_in:
            a += ["-m", "physdev", "!", "--physdev-is-in"]
        if self.addrtype_local:
            a += ["-m", "addrtype", "--dst-type", "LOCAL"]
        if self.ctstate_not_dnat:
            a += ["-m", "conntrack", "!", "--ctstate", "DNAT"]
        if self.state_new:
            a += ["-m", "state", "--state", "NEW"]
        a += [quote(m) for m in self.matches] if quoted else list(self.matches)
        return a + self.target.args()

    @functools.cached_property
    def line(self) -> str:
        """`-A CHAIN args` as iptables-restore reads it. Computed once per rule: builders hand
        back the same Rule objects while a service port is unchanged."""
        return " ".join(["-A", self.chain, *self.args(quoted=True)])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rule) and self.line == other.line

    def __hash__(self) -> int:
        return hash(self.line)


def quote(arg: str) -> str:
    """An argument as iptables-restore (and iptables-save) spell it."""
    return f'"{arg}"' if " " in arg or ";" in arg or not arg else arg


_UNSAFE = re.compile(r"[^A-Za-z0-9._:/-]")


def safe_comment(text: str) -> str:
    """Kubernetes names never need more than these characters; anything else (from a
    hand-written manifest) is replaced so it cannot break an iptables-restore batch."""
    return _UNSAFE.sub("_", text)[:255]


@dataclass(frozen=True)
class Jump:
    """A rule in a built-in chain that sends traffic into one of ours."""

    table: str
    chain: str
    rule: Rule
    first: bool  # inserted at the top (True) or appended (False)


@dataclass
class Ruleset:
    """Per table, per chain, the rules in order."""

    chains: dict[str, dict[str, list[Rule]]]

    @classmethod
    def of(cls, layout: Mapping[str, Iterable[str]]) -> Ruleset:
        """Empty chains, per table, in the order they are written."""
        return cls({table: {c: [] for c in chains} for table, chains in layout.items()})

    def table_of(self, chain: str) -> str:
        for table, chains in self.chains.items():
            if chain in chains:
                return table
        raise KeyError(f"chain {chain} is not in this ruleset")

    def add(self, rule: Rule, table: str | None = None) -> None:
        """Append `rule` to its chain; a chain not declared yet needs its `table`."""
        if table is None:
            table = self.table_of(rule.chain)
        self.chains[table].setdefault(rule.chain, []).append(rule)

    def declare(self, table: str, chain: str) -> None:
        """A chain that exists even when it holds no rule."""
        self.chains[table].setdefault(chain, [])

    def rules(self, chain: str) -> list[Rule]:
        return self.chains[self.table_of(chain)][chain]

    def __len__(self) -> int:
        return sum(len(r) for chains in self.chains.values() for r in chains.values())


@dataclass
class ChainChange:
    removed: list[Rule] = field(default_factory=list)
    added: list[Rule] = field(default_factory=list)


def diff(old: Ruleset, new: Ruleset) -> dict[str, dict[str, ChainChange]]:
    """Per table and chain, the rules to delete and to append to turn `old` into `new`, for
    chains whose order carries no meaning (every rule matches a different destination, or
    they all refuse), where appending is as good as rewriting. Chains without a change are
    left out."""
    out: dict[str, dict[str, ChainChange]] = {}
    for table, chains in new.chains.items():
        for chain, rules in chains.items():
            previous = old.chains.get(table, {}).get(chain, [])
            if previous == rules:
                continue
            before, after = Counter(previous), Counter(rules)
            change = ChainChange(
                list((before - after).elements()), list((after - before).elements())
            )
            out.setdefault(table, {})[chain] = change
    return out


@dataclass(frozen=True)
class JumpPlan:
    """How to bring the built-in chains' jumps into shape: delete every rule jumping to a
    `remove` target, then add `add` in order (first-jumps are inserted at the top)."""

    remove: tuple[Jump, ...] = ()
    add: tuple[Jump, ...] = ()


def plan_jumps(present: Mapping[tuple[str, str], Sequence[str]], jumps: Sequence[Jump]) -> JumpPlan:
    """From the jump targets found in each built-in chain, top to bottom, what to fix.

    Missing jumps are added. A top jump must also sit above every top jump listed before it
    in `jumps` (the portals' proxy-port guard above NON-LOCAL, which would otherwise accept a
    direct connection first): when one is missing or out of place, the later ones are
    re-inserted too. Jumps that are present and in order are left alone, so rules other
    programs insert above ours keep their place.
    """
    remove: list[Jump] = []
    add: list[Jump] = []
    for i, jump in enumerate(jumps):
        targets = list(present.get((jump.table, jump.chain), ()))
        target = jump.rule.target.name
        if target not in targets:
            add.append(jump)
            continue
        if not jump.first:
            continue
        earlier = [
            j for j in jumps[:i] if j.first and (j.table, j.chain) == (jump.table, jump.chain)
        ]
        misplaced = any(
            j in add or targets.index(j.rule.target.name) < targets.index(target) for j in earlier
        )
        if misplaced:
            remove.append(jump)
            add.append(jump)
    return JumpPlan(tuple(remove), tuple(add))
